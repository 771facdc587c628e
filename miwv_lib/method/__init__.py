"""The paper's method, Section 3, in one sitting: pure functions, no run directories, no file writes.
``neighbors`` (step 1) → ``layouts`` (which tokens each loss covers) → ``losses`` (the response-only loss engine)
→ ``importance`` (MIWV = one-shot − zero-shot, and IFD) → ``selection`` (top floor(r·N)) → ``pairwise`` (evaluation).
"""
