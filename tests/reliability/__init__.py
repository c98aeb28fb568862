"""Reliability suite: fault injection on a real local Ray, the bad-input corpus, security basics."""
