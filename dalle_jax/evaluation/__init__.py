"""Zero-shot evaluation: the attribute judge and the held-out-caption evaluation."""
