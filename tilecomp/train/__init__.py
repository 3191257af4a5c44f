"""Training the shipped example model: corpus, tokenizer, MiMo target (MXFP4 QAT), DFlash draft."""
