"""CodecLM data factory: tailored synthetic instruction data, made and measured on Prefect."""

import os

# litellm fetches its price map from the network at import unless told otherwise; we run offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
