"""msclap frontend: log-mel against torchlibrosa as msclap builds it, the fallback filterbank against librosa,
and waveform fitting against `CLAPWrapper.load_audio_into_tensor` (tiling, random crop, stereo concat)."""

from __future__ import annotations

import importlib.util
import random

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("librosa", reason="librosa is not installed (pip install -e '.[test]')")
pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
import librosa  # noqa: E402
import torch  # noqa: E402
from msclap_reference import make_signal

from mlx_clap.dsp import slaney_mel_filterbank
from mlx_clap.models.msclap.config import MsClapConfig
from mlx_clap.models.msclap.logmel import log_mel
from mlx_clap.preprocess.msclap_frontend import fit_clip, prepare_batch, to_mono

SR = 44100


@pytest.fixture(scope="module")
def spectrogram():
    """msclap's Spectrogram (window 1024, hop 320); building its DFT kernels takes seconds, so once."""
    from torchlibrosa.stft import Spectrogram

    return Spectrogram(
        n_fft=1024,
        hop_length=320,
        win_length=1024,
        window="hann",
        center=True,
        pad_mode="reflect",
        freeze_parameters=True,
    )


def torchlibrosa_logmel(spectrogram, wave: np.ndarray, design_sr: int) -> tuple[np.ndarray, np.ndarray]:
    """msclap's LogmelFilterBank (64 mels, 50-14000 Hz designed at `design_sr`, no top_db) on the spectrum."""
    from torchlibrosa.stft import LogmelFilterBank

    mel = LogmelFilterBank(
        sr=design_sr,
        n_fft=1024,
        n_mels=64,
        fmin=50,
        fmax=14000,
        ref=1.0,
        amin=1e-10,
        top_db=None,
        freeze_parameters=True,
    )
    with torch.no_grad():
        out = mel(spectrogram(torch.from_numpy(wave)))[:, 0].numpy()
    return out, mel.melW.detach().numpy()


@pytest.mark.parametrize("version", ["2023", "2022"])
def test_log_mel_matches_torchlibrosa(spectrogram, version):
    cfg = MsClapConfig.for_version(version)
    wave = np.stack([make_signal(cfg.clip_samples, seed=3), make_signal(cfg.clip_samples, seed=4)])
    ref, mel_w = torchlibrosa_logmel(spectrogram, wave, cfg.mel_sampling_rate)
    ours = np.array(log_mel(mx.array(wave), mx.array(mel_w)))
    assert ours.shape == ref.shape == (2, {"2023": 965, "2022": 690}[version], 64)
    assert np.abs(ours - ref).max() <= 1e-3
    floor = ref <= -100.0 + 1e-6
    assert floor.any()
    np.testing.assert_array_equal(ours[floor], ref[floor])


@pytest.mark.parametrize("design_sr", [32000, 44100])
def test_fallback_filterbank_matches_librosa(design_sr):
    ref = librosa.filters.mel(sr=design_sr, n_fft=1024, n_mels=64, fmin=50, fmax=14000).T
    ours = slaney_mel_filterbank(design_sr, 1024, 64, 50, 14000)
    assert ours.shape == ref.shape == (513, 64)
    assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()


def test_filterbank_rejects_fmax_above_nyquist():
    with pytest.raises(ValueError, match="Nyquist"):
        slaney_mel_filterbank(16000, 1024, 64, 50, 14000)


# ------------------------------------------------------------------------- waveform fitting vs msclap


@pytest.fixture(scope="module")
def wrapper():
    if importlib.util.find_spec("msclap") is None:
        pytest.skip("msclap 1.3.4 is not installed: pip install --no-deps msclap==1.3.4")
    from msclap_reference import import_msclap

    _, CLAPWrapper = import_msclap()
    w = CLAPWrapper.__new__(CLAPWrapper)
    w.args = w.read_config_as_args(
        "sampling_rate: 44100\nduration: 7\n", is_config_str=True
    )  # only the clip settings matter here
    return w


def reference_fit(wrapper, wave: np.ndarray, seed: int) -> np.ndarray:
    """`load_audio_into_tensor` on an in-memory (channels, N) clip, after `random.seed(seed)`."""
    from msclap_reference import clip_loader

    random.seed(seed)
    with clip_loader(wave, SR):
        return wrapper.load_audio_into_tensor("x.wav", wrapper.args.duration, resample=False).numpy()


@pytest.mark.parametrize(
    "shape, stereo",
    [
        ((3 * SR,), "mean"),  # short: tiled
        ((7 * SR,), "mean"),  # exact length: tiled once (msclap's >= test)
        ((7 * SR - 1,), "mean"),
        ((9 * SR + 17,), "mean"),  # long: random crop
        ((2, 2 * SR), "concat"),  # stereo played one channel after the other, then tiled
        ((2, 5 * SR), "concat"),  # 10 s after concatenation: random crop
    ],
)
def test_reference_modes_equal_msclap(wrapper, shape, stereo):
    rng = np.random.default_rng(sum(shape))
    wave = rng.standard_normal(shape).astype(np.float32)
    n = 7 * SR
    for seed in (0, 5):
        ref = reference_fit(wrapper, wave, seed)
        clips, owner = prepare_batch([wave], n, long_audio="reference", stereo=stereo, seed=seed)
        assert clips.shape == (1, n) and owner.tolist() == [0]
        np.testing.assert_array_equal(clips[0], ref)


def test_stereo_default_is_channel_mean():
    wave = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32)
    np.testing.assert_allclose(to_mono(wave), wave.mean(axis=0), rtol=0, atol=1e-7)
    assert to_mono(wave, "concat").shape == (2000,)


def test_windows_cover_long_audio_deterministically():
    wave = np.arange(25, dtype=np.float32)
    clips = fit_clip(wave, 10)
    assert [c[0] for c in clips] == [0, 10, 15]  # the last window ends at the end of the audio
    assert [c[0] for c in fit_clip(np.arange(20, dtype=np.float32), 10)] == [0, 10]
    assert fit_clip(wave, 10, "head")[0][0] == 0
    assert fit_clip(wave, 10, "center")[0][0] == 7
    clips, owner = prepare_batch([wave, np.ones(4, np.float32)], 10)
    assert owner.tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(clips[3], np.ones(10, np.float32))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
        (np.array([0.0, np.inf], np.float32), "NaN or infinite"),
        (np.zeros((1, 2, 3), np.float32), "1-D"),
        (np.zeros((1000, 2), np.float32), "looks like"),
        (np.array(["a", "b"]), "numeric"),
    ],
)
def test_bad_audio_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        prepare_batch([np.ones(10, np.float32), bad], 10)
    with pytest.raises(ValueError, match="audio item 1"):
        prepare_batch([np.ones(10, np.float32), bad], 10)


def test_bad_modes():
    with pytest.raises(ValueError, match="long_audio"):
        fit_clip(np.ones(20, np.float32), 10, "random")
    with pytest.raises(ValueError, match="stereo"):
        to_mono(np.ones((2, 20), np.float32), "left")
