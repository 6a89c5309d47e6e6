"""Near-duplicate audio end to end: real files (one clip re-encoded as MP3 and AAC at several bitrates,
trimmed by 50 ms, gain-changed) among unrelated clips, embedded by `mlx-clap embed` into a store, then
`mlx-clap search --audio` and `mlx-clap dedupe`.

No pretrained weights are reachable here, so the model is the tiny random-init one. What its
embeddings do (measured; REPORT in the module's print-out with `pytest -s`):
- every clip lands in a narrow cone (all cosines > 0.97), so absolute thresholds mean nothing and the
  default 0.97 merges unrelated clips; pretrained CLAP spreads unrelated clips out (well below 0.9);
- the ranking is right: the eight variants are the eight nearest neighbours of the original;
- codec re-encodes (MP3 56-320 kbit/s, AAC 64/128 kbit/s) and the 50-ms trim stay closer to the
  original than any two unrelated clips are to each other, so one threshold groups them and nothing
  else; the gain-changed copies do not (random weights have not learned level invariance: a gain
  change shifts every log-mel value, and an unrelated pair is closer than gain copy and original).

The threshold is picked from the measured scores, the way one would calibrate a real model on a
labelled sample: halfway between the highest cosine of any pair that involves an unrelated clip and
the lowest cosine between the original and a codec re-encode.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_cli_search import run

from mlx_clap.store import Store

SR = 44100
CODEC = ["mp3_320k.mp3", "mp3_160k.mp3", "mp3_56k.mp3", "aac_128k.m4a", "aac_64k.m4a"]
EDITS = ["trim_50ms.wav", "gain_minus6db.wav", "gain_plus4db.flac"]
VARIANTS = ["orig.wav", *CODEC, *EDITS]


def scene(seed: int, dur: float = 6.0) -> np.ndarray:
    """Sustained harmonic notes with smooth envelopes over a slowly modulated noise bed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(dur * SR)) / SR
    x = np.zeros_like(t)
    for s in np.sort(rng.uniform(-0.5, dur - 1.0, int(rng.integers(4, 8)))):
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        d = rng.uniform(1.0, 3.0)
        env = np.clip(np.minimum((t - s) / 0.3, (s + d - t) / 0.5), 0, 1)
        for h in range(1, 8):
            x += env * rng.uniform(0.1, 0.5) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3))
    noise = np.convolve(rng.standard_normal(len(t)), np.ones(int(rng.integers(2, 30))), "same")
    x += 0.05 * (1 + np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t)) * noise / noise.std()
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def write_aac(path: Path, x: np.ndarray, bitrate: int) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=SR)
        st.layout = "mono"
        st.bit_rate = bitrate
        for i in range(0, len(x), 1024):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[None, i : i + 1024]), format="fltp", layout="mono"
            )
            fr.sample_rate, fr.pts, fr.time_base = SR, i, Fraction(1, SR)
            for p in st.encode(fr):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)


@pytest.fixture(scope="module")
def audio_store(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:  # noqa: F811
    audio = tmp_path_factory.mktemp("dupes")
    base = scene(0)
    sf.write(audio / "orig.wav", base, SR)
    # libsndfile >= 1.1 writes MP3 (LAME); compression_level 0 / 0.5 / 0.9 give about 320 / 160 / 56 kbit/s.
    for name, level in zip(CODEC[:3], (0.0, 0.5, 0.9), strict=True):
        sf.write(audio / name, base, SR, format="MP3", compression_level=level, bitrate_mode="CONSTANT")
    write_aac(audio / "aac_128k.m4a", base, 128_000)
    write_aac(audio / "aac_64k.m4a", base, 64_000)
    sf.write(audio / "trim_50ms.wav", base[int(0.05 * SR) :], SR)
    sf.write(audio / "gain_minus6db.wav", base * 10 ** (-6 / 20), SR)
    sf.write(audio / "gain_plus4db.flac", np.clip(base * 10 ** (4 / 20), -1, 1), SR)
    for s in range(1, 13):
        sf.write(audio / f"other_{s:02d}.wav", scene(100 + s), SR)
    t = np.arange(6 * SR) / SR
    sf.write(audio / "other_noise.wav", (0.2 * np.random.default_rng(7).standard_normal(6 * SR)), SR)
    sf.write(audio / "other_sweep.wav", 0.3 * np.sin(2 * np.pi * (100 * t + 400 * t**2)), SR)
    store = tmp_path_factory.mktemp("dupes_store") / "store"
    r = run(["embed", audio, "--model", tiny_model_dir, "--out", store, "--store-dtype", "float32", "-q"])
    assert r.exit_code == 0, r.output
    return audio, store


def measured(store_path: Path) -> tuple[list[str], np.ndarray]:
    store = Store.open(store_path)
    names = [Path(it["path"]).name for it in store.items]
    m = store.matrix()
    return names, m @ m.T


def pick_threshold(names: list[str], sims: np.ndarray) -> tuple[float, float, float]:
    """(threshold, highest unrelated cosine, lowest original-to-codec cosine)."""
    var = np.array([n in VARIANTS for n in names])
    off = ~np.eye(len(names), dtype=bool)
    unrelated_max = float(sims[off & ~(var[:, None] & var[None, :])].max())
    orig = names.index("orig.wav")
    codec_min = float(min(sims[orig, names.index(c)] for c in CODEC))
    return (unrelated_max + codec_min) / 2, unrelated_max, codec_min


def test_search_audio_ranks_the_variants_first(audio_store):
    audio, store = audio_store
    names, sims = measured(store)
    assert len(names) == len(VARIANTS) + 14
    r = run(["search", store, "--audio", audio / "orig.wav", "-k", str(len(VARIANTS)), "--json"])
    assert r.exit_code == 0, r.output
    got = [Path(x["path"]).name for x in json.loads(r.stdout)["results"]]
    assert set(got) == set(VARIANTS), got  # the original itself (stored too) and its 8 variants
    # The same from a variant that is not the original: the other variants come next.
    r = run(["search", store, "--like", audio / "mp3_56k.mp3", "-k", str(len(VARIANTS) - 1), "--json"])
    got = [Path(x["path"]).name for x in json.loads(r.stdout)["results"]]
    assert set(got) == set(VARIANTS) - {"mp3_56k.mp3"}, got


def test_dedupe_at_the_measured_threshold(audio_store):
    _, store = audio_store
    names, sims = measured(store)
    threshold, unrelated_max, codec_min = pick_threshold(names, sims)
    orig = names.index("orig.wav")
    report = {n: round(float(sims[orig, names.index(n)]), 6) for n in VARIANTS[1:]}
    print(f"\nrandom-init tiny HTSAT, cosine to the original: {report}")
    print(
        f"highest cosine of a pair with an unrelated clip: {unrelated_max:.6f}; all pairs >= {sims.min():.4f}"
    )
    print(f"threshold = ({unrelated_max:.6f} + {codec_min:.6f}) / 2 = {threshold:.6f}")
    assert codec_min > unrelated_max, "codec re-encodes are no closer than unrelated clips"

    r = run(["dedupe", store, "--threshold", f"{threshold:.6f}", "--json"])
    assert r.exit_code == 0, r.output
    groups = [[Path(p).name for p in g["paths"]] for g in json.loads(r.stdout)["groups"]]
    assert len(groups) == 1, groups  # nothing unrelated is grouped, with the variants or each other
    group = set(groups[0])
    assert {"orig.wav", *CODEC} <= group <= set(VARIANTS)
    # What random weights can and cannot do (see the module docstring): the trim joins, gain copies do not.
    assert "trim_50ms.wav" in group
    assert group.isdisjoint({"gain_minus6db.wav", "gain_plus4db.flac"})
    # The default threshold is meant for pretrained weights; here it would merge everything.
    r = run(["dedupe", store, "--json"])
    biggest = [Path(p).name for p in json.loads(r.stdout)["groups"][0]["paths"]]
    assert any(n.startswith("other_") for n in biggest) and "orig.wav" in biggest
