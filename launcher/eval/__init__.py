"""Does the longer context answer: passkey retrieval (probe) and the loss curve (ppl)."""
