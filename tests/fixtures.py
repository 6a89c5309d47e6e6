"""Small shared test fixtures: tiny model configs and a converted tiny model folder.

The tiny configs keep the real frontend (1001 x 64 mels, spec_size 256, window 8) so every code path
runs, with narrow layers so a forward pass takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

TINY_AUDIO = dict(
    patch_embeds_hidden_size=16,
    depths=[1, 1, 1, 1],
    num_attention_heads=[1, 2, 4, 8],
    hidden_size=128,
)
TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


# ------------------------------------------------------------------------------------------ tokenizer
# Texts for tokenizer equality tests (docs/numerics.md §9): empty, one word, punctuation, unicode, emoji,
# newlines, leading/trailing spaces, contractions, digits, and one longer than 77 tokens (truncation).
TOKENIZER_TEXTS = [
    "",
    "dog",
    "This is a sound of a dog barking.",
    "Hello, world!!! What's that?! (a cat; maybe...) -- 'quoted' \"double\"",
    "Café naïve façade — Straße, Ωμέγα, 東京の音, Привет",
    "emoji 🐶🔊🎵 and 👩‍👩‍👧 family",
    "line one\nline two\r\n\ttabbed\n\n",
    "   leading and trailing spaces   ",
    " x",
    "I'm sure they'll say it's 1234 or 3.14159 times 42",
    " ".join(f"word{i} and sound" for i in range(40)),
]


def _bpe_corpus(n_words: int = 6000, seed: int = 0) -> list[str]:
    """A deterministic corpus with enough distinct pairs for ~1000 byte-level BPE tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    lines += [t for t in TOKENIZER_TEXTS if t] * 3
    lines += ["This is a sound of a dog barking.", "This audio is a jazz song.", "a cat meows loudly"] * 20
    return lines


def train_bpe_files(folder: Path, vocab_size: int = 1000) -> tuple[Path, Path]:
    """Train a RoBERTa-style byte-level BPE offline and save vocab.json + merges.txt in `folder`.

    Special tokens get RoBERTa's ids: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
    """
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _bpe_corpus(),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(folder))
    return folder / "vocab.json", folder / "merges.txt"


# ------------------------------------------------------------------------------------------ rankings
# Two rows whose scores differ by float rounding only (a file and its byte-identical copy) may come in
# either order: BLAS kernels differ between CPUs and between numpy and MLX. Rankings compare up to such ties.
RANK_TIE = 1e-6


def assert_same_ranking(got: list, want: list, scores, tol: float = RANK_TIE) -> None:
    """`got` ranks as `want` does, where rows whose `scores` (an array by row, or a dict) agree within
    `tol` may swap places.

    Position by position, the score of the row got must equal the score of the row wanted (within tol):
    any other row than a tied one has another score, so this still fails on a wrong ranking."""
    import numpy as np

    if not isinstance(scores, dict):
        scores = np.asarray(scores, dtype=np.float64)
    assert len(got) == len(want), (got, want)
    assert len(set(got)) == len(got), f"a row is ranked twice: {got}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w or abs(scores[g] - scores[w]) <= tol, (
            f"rank {i}: row {g} (score {scores[g]:.9f}) where row {w} (score {scores[w]:.9f}) belongs; "
            f"got {got}, want {want}"
        )


# ------------------------------------------------------------------------------------------ signals
def default_sigint() -> None:
    """preexec_fn for a child a test interrupts: SIGINT back to its default action.

    A shell starts background jobs (`nohup bash .ci/run &`, cron) with SIGINT ignored, and an ignored
    signal stays ignored across fork and exec, so without this the child would never see the Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class NewStore:
    """A store made for a test (mlx_clap.store.Store on Lance), holding no lock between calls: each
    `write` is one writer session and one commit, and reads go to a fresh snapshot of the newest
    version, so a subprocess or a CLI command can write the same store meanwhile."""

    def __init__(self, path, manifest: dict, dim: int, dtype: str = "float16", segments: dict | None = None):
        from mlx_clap.store import Store

        Store.create(path, manifest, dim=dim, dtype=dtype, segments=segments).close()
        self.path = Path(path)

    def write(self, items, vectors, segments=None) -> int:
        from mlx_clap.store import Store

        with Store.open(self.path, write=True) as w:
            return w.write(items, vectors, segments)

    def snapshot(self):
        from mlx_clap.store import Store

        return Store.open(self.path)

    def __len__(self) -> int:
        return len(self.snapshot())

    def __getattr__(self, name: str):
        return getattr(self.snapshot(), name)


def create_store(
    path, manifest: dict, dim: int, dtype: str = "float16", shard_size: int | None = None, **kw
) -> NewStore:
    """`NewStore(path, manifest, dim, dtype, segments=...)`; `shard_size` (of the older .npy format) has
    no counterpart on Lance and is ignored."""
    return NewStore(path, manifest, dim, dtype, kw.get("segments"))


def add_rows(path, items, vectors, segments=None) -> int:
    """Write rows into the store at `path` in one writer session (one commit); returns its version."""
    from mlx_clap.store import Store

    with Store.open(path, write=True) as w:
        return w.write(items, vectors, segments)


# ------------------------------------------------------------------------------------------ audio files
def encode_pyav(path: Path, x: np.ndarray, rate: int, codec: str, container: str) -> Path:
    """Encode (n, 2) float32 with PyAV (stereo); frame pts let the muxer write priming info."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(str(path), "w", format=container) as out:
        st = out.add_stream(codec, rate=rate)
        st.layout = "stereo"
        formats = [f.name for f in st.codec_context.codec.audio_formats]
        fmt = "fltp" if "fltp" in formats else "s16p"
        for i in range(0, len(x), 1152):
            arr = np.ascontiguousarray(x[i : i + 1152].T)
            if fmt == "s16p":
                arr = np.round(arr * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return path


def require_encoder(name: str) -> None:
    """Skip, saying why, when the installed PyAV cannot encode with `name`."""
    import av
    import pytest

    try:
        av.codec.Codec(name, "w")
    except ValueError as exc:
        pytest.skip(f"the installed PyAV (av {av.__version__}) has no {name!r} encoder: {exc}")


def noise(n: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    """(n, channels) float32 white noise at 0.1 RMS, seeded."""
    return (0.1 * np.random.default_rng(seed).standard_normal((n, channels))).astype(np.float32)


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) for the duration, yielding its endpoint URL. Skips the
    test (or module) when moto is not installed."""
    import pytest

    moto_server = pytest.importorskip("moto.server", reason="moto is not installed (the `test` extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_bucket(endpoint: str, monkeypatch):
    """A fresh bucket on the local S3 server at `endpoint`, with the environment a user would set (keys,
    region, AWS_ENDPOINT_URL) and nothing of the machine's own AWS settings: (name, pyarrow S3FileSystem)."""
    import uuid

    import pyarrow.fs as pafs

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint.split("://")[1],
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    name = f"b-{uuid.uuid4().hex[:12]}"
    fs.create_dir(name)
    return name, fs


def run(args: list):
    """`mlx-clap ARGS` in this process (click's CliRunner), every argument as a string: the Result."""
    from click.testing import CliRunner

    from mlx_clap.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def summary_of(result) -> dict:
    """The --summary-json object of a command's Result (the last JSON line of its output)."""
    import json

    for line in reversed(result.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(result.output)
