"""Model file readers and writers: GGML (ggml/ggmf/ggjt v1-v3), GGUF, split .zip/.z01 archives."""
