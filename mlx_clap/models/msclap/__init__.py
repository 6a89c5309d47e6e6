"""Microsoft CLAP (msclap 1.3.4) models in MLX: 2022 (Cnn14 + BERT) and 2023 (HTSAT-tiny + GPT-2).

    import mlx_clap
    model = mlx_clap.load("weights/msclap-2023")  # a folder written by `mlx-clap convert --family msclap`
    audio = model.embed_audio(["dog.wav"])               # (1, 1024) unit vectors
    probs = model.classify("dog.wav", ["dog", "rain"])   # prompts "this is the sound of <label>"

See `model.py` for the differences from the LAION models (un-normalized tower outputs, one logit scale,
44.1 kHz input, 5/7-s clips). Nothing is imported here.
"""
