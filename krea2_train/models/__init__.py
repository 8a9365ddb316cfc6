"""Model loading (real on-disk formats), the tiny embedded Krea 2, text encoding and the VAE wrapper."""
