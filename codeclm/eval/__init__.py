"""Measuring: CRR maths, evaluation plans and reports, the loop (base against tuned) and the protocol (Table 1)."""
