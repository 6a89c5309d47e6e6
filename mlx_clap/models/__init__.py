"""The MLX models: HTSAT and RoBERTa towers (LAION/HF CLAP) and Microsoft CLAP. Imports nothing at load."""
