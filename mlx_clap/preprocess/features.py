"""The CLAP mel frontend in MLX: STFT, both log-mel filterbanks, padding, truncation and fusion inputs.

Numerics follow docs/numerics.md §2-§3 and reproduce transformers' `ClapFeatureExtractor` (numpy) and
laion_clap's in-model torchlibrosa path:

- periodic Hann window of `fft_window_size` (librosa `get_window('hann', n, fftbins=True)`; `mx.hanning`
  is the symmetric form and is not used);
- reflect padding of n_fft/2 on both sides (edge sample not repeated), frames = 1 + N // hop;
- one-sided power spectrum re^2 + im^2 from `mx.fft.rfft` in float32. A float32 DFT matmul was measured
  both slower (12x on this Linux CPU with OpenBLAS) and less exact (max error 4.4e-7 of the peak bin vs
  1.4e-7 for rfft, on 200 windowed tones);
- mel matmul, then 10*log10(max(x, 1e-10)): reference 1, no top_db, so the floor is -100 dB;
- two filterbanks, built once in numpy float64 and cached: Slaney scale + Slaney area norm (librosa's
  default, used by `rand_trunc`/unfused models) and HTK scale without norm (torchaudio's default, used by
  the fused models' `fusion` path). librosa is not needed at runtime.

Random draws (the `rand_trunc` crop, the fusion chunk picks, HF's random `is_longer` flag, LAION's
compatibility crop) go through numpy's legacy global RNG in the same order as the reference, so
`np.random.seed(s)` before both gives the same crops; an explicit `np.random.RandomState` is accepted too.

Precision: float32 rounding in any STFT (ours, or LAION's float32 torchlibrosa conv) sits ~144 dB below a
frame's strongest bin, so on full-scale pure tones and chirps the mel bands 80+ dB below the frame peak
move by 1e-2 to 1 dB against HF's float64 STFT (LAION's own float32 path moves by 1e-2 to 1e-1 dB there).
On audio with a noise floor the float32 path is within ~1e-4 dB of HF. `precision="float64"` gives HF's
numbers everywhere (within float32 output rounding), on the CPU, at several times the cost.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_clap.config import FeatureConfig
from mlx_clap.dsp import AMIN, hz_to_mel, mel_filterbank, mel_to_hz, periodic_hann, stft_log_mel
from mlx_clap.ops import parallel as cpu_parallel
from mlx_clap.ops.device import cpu_fast_paths
from mlx_clap.preprocess.windows import clip_windows

# Fused inputs stack 4 channels: the shrunk whole clip, then front, middle and back chunks.
FUSION_CHANNELS = 4
# Frames per STFT graph before the work is cut into blocks, so a long file (an hour is 360k frames, i.e.
# 1.5 GB of float32 frames) never materializes at once. 16384 frames is about 64 MB of frames.
MAX_FRAMES_PER_BLOCK = 16384
# On the CPU, blocks are much smaller: a batch of 8 clips as one graph has 33 MB frame and spectrum
# arrays, past glibc's largest mmap threshold (32 MB), so every call maps fresh pages and faults them in
# (measured 45-67 ms for 8 clips). Blocks of one clip (4 MB) evaluated one after another reuse
# the allocator's cached buffers: 13-18 ms for the same 8 clips (benchmarks/bench_features.py).
MAX_FRAMES_PER_BLOCK_CPU = 1024

TRUNCATIONS = ("rand_trunc", "fusion", "head", "center")
PADDINGS = ("repeatpad", "repeat", "pad")
LONG_AUDIO_MODES = ("windows-mean", "head", "center", "fusion", "reference")


class AudioInputError(ValueError):
    """A waveform that cannot be featurized as given; the message says what is wrong and for which item."""


# ------------------------------------------------------------------------------------- waveform ops


def quantize_int16(x: np.ndarray) -> np.ndarray:
    """LAION's int16 round trip: trunc(32767 * clip(x, -1, 1)) / 32767, as float32.

    Same operations as laion_clap `int16_to_float32(float32_to_int16(x))` (`--quantize-int16`).
    """
    x = np.asarray(x, dtype=np.float32)
    q = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


# The extractor's keyword argument `quantize_int16` shadows the function inside its methods.
_quantize = quantize_int16


def pad_waveform(x: np.ndarray, length: int, padding: str = "repeatpad") -> np.ndarray:
    """Fill a waveform shorter than `length` (docs/numerics.md §3.1); longer inputs are returned unchanged.

    `repeatpad`: tile int(length / N) times, zero-pad the rest; `repeat`: tile and cut; `pad`: zero-pad.
    """
    n = x.shape[0]
    if n >= length:
        return x
    if n == 0:
        raise AudioInputError("cannot pad an empty waveform")
    if padding == "repeat":
        return np.tile(x, int(length / n) + 1)[:length]
    if padding == "repeatpad":
        x = np.tile(x, int(length / n))
    elif padding != "pad":
        raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
    return np.pad(x, (0, length - x.shape[0]), mode="constant")


@functools.lru_cache(maxsize=64)
def bilinear_shrink_weights(in_frames: int, out_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and weights of a bilinear, align_corners=False, no-antialias resize along time.

    Returns (i0, i1, w1) such that out[i] = (1 - w1[i]) * x[i0[i]] + w1[i] * x[i1[i]]; this is the sparse
    form of the (out_frames, in_frames) interpolation matrix (two non-zeros per row), so an hour of audio
    does not need a dense 1001 x 360000 matrix. The source index follows torch's CPU kernel:
    src = max(scale * (i + 0.5) - 0.5, 0) with scale = float32(in / out), where the multiply-subtract is
    one fused multiply-add (a single rounding to float32: exact in float64, then rounded).
    """
    scale = np.float32(in_frames) / np.float32(out_frames)
    dst = np.arange(out_frames, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    i0 = np.minimum(i0, in_frames - 1)
    i1 = np.minimum(i0 + 1, in_frames - 1)
    for a in (i0, i1, w1):
        a.setflags(write=False)
    return i0, i1, w1


def fusion_ranges(total_frames: int, chunk_frames: int) -> list[np.ndarray]:
    """Start frames of the front, middle and back thirds (empty middle/back become [0]), as in HF/LAION."""
    ranges = np.array_split(np.arange(0, total_frames - chunk_frames + 1), 3)
    if len(ranges[1]) == 0:
        ranges[1] = np.array([0])
    if len(ranges[2]) == 0:
        ranges[2] = np.array([0])
    return ranges


# ----------------------------------------------------------------------------------- input checking


def check_waveform(x: Any, index: int) -> np.ndarray:
    """One mono waveform as a float32 numpy array, or AudioInputError naming the item."""
    where = f"audio item {index}"
    if isinstance(x, mx.array):
        x = np.array(x)
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError as err:
            raise AudioInputError(f"{where}: not a rectangular array of samples ({err})") from None
    if not isinstance(x, np.ndarray):
        raise AudioInputError(f"{where}: expected a 1-D numpy array of float samples, got {type(x).__name__}")
    if x.dtype == object:
        raise AudioInputError(f"{where}: array has dtype object; expected float samples")
    if np.iscomplexobj(x):
        raise AudioInputError(f"{where}: complex samples ({x.dtype}); expected a real float waveform")
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
        raise AudioInputError(
            f"{where}: integer samples ({x.dtype}); convert to float32 in [-1, 1] first, "
            f"e.g. x.astype(np.float32) / 32768 for int16 PCM"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioInputError(f"{where}: unsupported dtype {x.dtype}; expected float32")
    if x.ndim != 1:
        hint = ""
        if x.ndim == 2:
            hint = (
                " If this is multichannel audio, downmix first (e.g. x.mean(axis=0) for (channels, samples));"
                " to pass a batch, pass a list of 1-D arrays."
            )
        raise AudioInputError(f"{where}: expected a 1-D mono waveform, got shape {x.shape}.{hint}")
    if x.shape[0] == 0:
        raise AudioInputError(f"{where}: empty waveform (0 samples)")
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise AudioInputError(
            f"{where}: contains NaN or Inf ({int((~finite).sum())} samples, first at sample {bad})"
        )
    return x


def as_waveform_list(raw_speech: Any) -> list[np.ndarray]:
    """Normalize one waveform or a sequence of waveforms to a list of checked float32 1-D arrays."""
    if isinstance(raw_speech, (np.ndarray, mx.array)):
        return [check_waveform(raw_speech, 0)]
    if isinstance(raw_speech, (list, tuple)):
        if len(raw_speech) == 0:
            raise AudioInputError("no audio given: the list of waveforms is empty")
        first = raw_speech[0]
        if isinstance(first, (int, float, np.number)):
            # A plain list of samples is one waveform (as HF accepts list[float]).
            return [check_waveform(np.asarray(raw_speech), 0)]
        return [check_waveform(x, i) for i, x in enumerate(raw_speech)]
    raise AudioInputError(f"expected a 1-D float array or a list of them, got {type(raw_speech).__name__}")


# ------------------------------------------------------------------------------------- MLX frontend


class MelFrontend:
    """STFT + log-mel in MLX for one FeatureConfig, with both filterbanks cached as mx arrays.

    `precision="float32"` (default) runs `mx.fft.rfft` in float32 on the default device. Its rounding
    error sits about 144 dB below the strongest bin of a frame, so mel bands more than ~80 dB below a
    frame's peak (pure tones, chirps) can differ from the float64 HF reference by more than 1e-3 dB.
    `precision="float64"` runs a float64 four-step FFT (two length-32 DFT matmuls and a twiddle, only the
    bins under the filterbank) on the CPU stream and matches HF's float64 numpy STFT to ~1e-5 dB (the
    float32 rounding of the output) everywhere, at several times the cost; MLX has no float64 on the GPU.
    """

    def __init__(self, config: FeatureConfig, precision: str = "float32"):
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', not {precision!r}")
        self.config = config
        self.precision = precision
        self.n_fft = int(config.fft_window_size)
        self.hop = int(config.hop_length)
        self.dtype = mx.float32 if precision == "float32" else mx.float64
        # mx.array turns float64 numpy into float32 unless told otherwise.
        self.window = mx.array(periodic_hann(self.n_fft), dtype=self.dtype)
        self._fbs: dict[str, tuple[mx.array, Any]] = {}

    def filterbank(self, name: str) -> np.ndarray:
        """The float64 numpy filterbank `"slaney"` (Slaney scale + norm) or `"htk"` (HTK, no norm)."""
        c = self.config
        if name == "slaney":
            scale, norm = "slaney", "slaney"
        elif name == "htk":
            scale, norm = "htk", None
        else:
            raise ValueError(f"filterbank must be 'slaney' or 'htk', not {name!r}")
        return mel_filterbank(
            c.sampling_rate, self.n_fft, c.feature_size, c.frequency_min, c.frequency_max, scale, norm
        )

    def _mx_filterbank(self, name: str) -> tuple[mx.array, Any]:
        if name not in self._fbs:
            fb = self.filterbank(name)
            # Only FFT bins under some filter matter; dropping the all-zero rows (about 40% of them for
            # 50-14000 Hz at 48 kHz) shrinks the matmul and only removes exact zero terms from the sums.
            nz = np.flatnonzero(fb.any(axis=1))
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)
            if self.precision == "float32":
                core = mx.compile(functools.partial(self._core32, lo=lo, hi=hi))
                fb_mx = mx.array(fb[lo:hi].astype(np.float32))
            else:
                core = mx.compile(functools.partial(self._core64, dft=self._four_step_matrices(lo, hi)))
                fb_mx = mx.array(fb[lo:hi], dtype=mx.float64)
            self._fbs[name] = (fb_mx, core)
        return self._fbs[name]

    def _frames(self, segment: mx.array) -> mx.array:
        b, length = segment.shape
        n_frames = 1 + (length - self.n_fft) // self.hop
        return mx.as_strided(segment, (b, n_frames, self.n_fft), (length, self.hop, 1))

    def _core32(self, segment: mx.array, window: mx.array, fb: mx.array, lo: int, hi: int) -> mx.array:
        # segment: (B, L), already reflect-padded; fb holds rows lo..hi-1 of the filterbank.
        return stft_log_mel(segment, window, fb, self.hop, lo, hi)

    def _four_step_matrices(self, lo: int, hi: int) -> dict[str, Any]:
        """Float64 matrices of the n = p*q four-step DFT that yields bins lo..hi-1."""
        n = self.n_fft
        p = max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)
        q = n // p
        # n = q*n1 + n2 (n1 < p, n2 < q); k = k1 + p*k2 (k1 < p, k2 < q).
        k2_lo, k2_hi = lo // p, (hi - 1) // p + 1
        ang1 = -2.0 * np.pi * np.outer(np.arange(p), np.arange(p)) / p  # [n1, k1]
        ang_t = -2.0 * np.pi * np.outer(np.arange(q), np.arange(p)) / n  # [n2, k1]
        ang2 = -2.0 * np.pi * np.outer(np.arange(q), np.arange(k2_lo, k2_hi)) / q  # [n2, k2]
        c2, s2 = np.cos(ang2), np.sin(ang2)
        f64 = functools.partial(mx.array, dtype=mx.float64)
        return dict(
            p=p, q=q, nk2=k2_hi - k2_lo, start=lo - k2_lo * p, stop=hi - k2_lo * p,
            # Step 1 as one GEMM: columns [cos | sin] of the length-p DFT.
            a1=f64(np.concatenate([np.cos(ang1), np.sin(ang1)], axis=1)),
            tr=f64(np.cos(ang_t)), ti=f64(np.sin(ang_t)),
            # Step 3 as one GEMM on [re | im] rows: [[cos, sin], [-sin, cos]] of the length-q DFT.
            b3=f64(np.block([[c2, s2], [-s2, c2]])),
        )  # fmt: skip

    def _core64(self, segment: mx.array, window: mx.array, fb: mx.array, dft: dict[str, Any]) -> mx.array:
        frames = self._frames(segment) * window
        b, f, _ = frames.shape
        p, q, nk2 = dft["p"], dft["q"], dft["nk2"]
        # Matmuls are kept 2-D (one GEMM per step): batched products of tiny matrices are slow on the CPU.
        m = b * f
        # Step 1: length-p DFTs over n1 for every n2 -> Y[m, n2, re/im, k1].
        x = frames.reshape(m, p, q).transpose(0, 2, 1).reshape(m * q, p)
        y = (x @ dft["a1"]).reshape(m, q, 2, p)
        yr, yi = y[:, :, 0], y[:, :, 1]
        # Step 2: twiddles exp(-2 pi i n2 k1 / n), broadcast over frames.
        zr = yr * dft["tr"] - yi * dft["ti"]
        zi = yr * dft["ti"] + yi * dft["tr"]
        # Step 3: length-q DFTs over n2, only for the k2 that hold the needed bins -> X[m, k1, re/im, k2].
        z = mx.stack([zr, zi], axis=2).transpose(0, 3, 2, 1).reshape(m * p, 2 * q)
        xk = (z @ dft["b3"]).reshape(m, p, 2, nk2)
        power = mx.square(xk[:, :, 0]) + mx.square(xk[:, :, 1])
        # Bin k = k1 + p*k2: order as [k2, k1] and flatten.
        power = power.transpose(0, 2, 1).reshape(b, f, nk2 * p)[..., dft["start"] : dft["stop"]]
        mel = mx.maximum(power @ fb, AMIN)
        return (10.0 * mx.log10(mel)).astype(mx.float32)

    def log_mel(
        self, batch: mx.array | np.ndarray | Sequence[np.ndarray], filterbank: str = "slaney"
    ) -> mx.array:
        """(B, N) or (N,) float waveforms, or a list of B equal-length 1-D numpy waveforms ->
        (B, 1 + N // hop, n_mels) log-mel in dB, float32."""
        if self.precision == "float64":
            with mx.stream(mx.cpu):  # MLX has no float64 on the GPU
                return self._log_mel(batch, filterbank)
        return self._log_mel(batch, filterbank)

    def _log_mel(self, batch: mx.array | np.ndarray | Sequence[np.ndarray], filterbank: str) -> mx.array:
        x = batch
        if isinstance(x, (list, tuple)):
            # Equal-length rows, kept apart: stacking a big batch would copy it once more.
            x = [np.asarray(w) for w in x]
            if not x or len({w.shape for w in x}) != 1 or x[0].ndim != 1:
                raise ValueError("log_mel takes a list of equal-length 1-D waveforms")
            b, n = len(x), x[0].shape[0]
        else:
            if x.ndim == 1:
                x = x[None]
            if x.ndim != 2:
                raise ValueError(f"log_mel takes (N,) or (B, N) waveforms, got shape {tuple(x.shape)}")
            b, n = x.shape
        half = self.n_fft // 2
        if n <= half:
            raise AudioInputError(f"log_mel needs more than {half} samples for reflect padding, got {n}")
        fb, core = self._mx_filterbank(filterbank)
        n_frames = 1 + n // self.hop
        budget = _frames_per_block()
        if b * n_frames <= budget:
            return core(self._padded(x, 0, b), self.window, fb)

        def mel_of(rows: mx.array) -> mx.array:
            with cpu_parallel.graph_lock:  # `core` is mx.compile'd
                return core(rows, self.window, fb)

        # Bigger inputs are cut into blocks that are evaluated one by one (on the CPU, several at once),
        # so memory stays bounded and every block reuses buffers the allocator has cached. Worker threads
        # cannot run graph nodes queued on this thread's stream, so inputs are evaluated here first.
        if isinstance(x, mx.array):
            mx.eval(x)
        if n_frames <= budget:
            rows_per_block = budget // n_frames
            groups = [(r0, min(b, r0 + rows_per_block)) for r0 in range(0, b, rows_per_block)]
            parts = cpu_parallel.map_blocks(lambda g: mel_of(self._padded(x, *g)), groups)
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        out_rows = []
        for r in range(b):  # long rows: one row at a time, cut into frame blocks
            row = self._padded(x, r, r + 1)
            mx.eval(row)
            spans = [(f0, min(n_frames, f0 + budget)) for f0 in range(0, n_frames, budget)]
            blocks = cpu_parallel.map_blocks(
                lambda s, row=row: mel_of(row[:, s[0] * self.hop : (s[1] - 1) * self.hop + self.n_fft]), spans
            )
            out_rows.append(mx.concatenate(blocks, axis=1))
        return out_rows[0] if len(out_rows) == 1 else mx.concatenate(out_rows, axis=0)

    def _padded(self, x: mx.array | np.ndarray | Sequence[np.ndarray], r0: int, r1: int) -> mx.array:
        """Rows r0..r1-1 of the waveforms, reflect-padded by n_fft / 2 on both sides, as an mx array."""
        half = self.n_fft // 2
        if isinstance(x, mx.array):
            return mx.pad(x[r0:r1].astype(self.dtype), [(0, 0), (half, half)], mode="reflect")
        # Reflect-padded in one numpy buffer (numpy's slicing is several times faster than
        # mx.pad(mode="reflect") on the CPU), then one copy into MLX.
        np_dtype = np.float32 if self.dtype == mx.float32 else np.float64
        rows = x[r0:r1]
        n = rows[0].shape[-1]
        buf = np.empty((r1 - r0, n + 2 * half), dtype=np_dtype)
        for i, row in enumerate(rows):
            buf[i, half : half + n] = row
        buf[:, :half] = buf[:, 2 * half : half : -1]  # x[half], ..., x[1]
        buf[:, half + n :] = buf[:, half + n - 2 : n - 2 : -1]  # x[n-2], ..., x[n-1-half]
        return mx.array(buf)


def _frames_per_block() -> int:
    """STFT frames per evaluated block on the current default device."""
    if cpu_fast_paths():
        return MAX_FRAMES_PER_BLOCK_CPU
    return MAX_FRAMES_PER_BLOCK


@functools.lru_cache(maxsize=8)
def _frontend_for(key: tuple, precision: str) -> MelFrontend:
    return MelFrontend(FeatureConfig.from_dict(dict(key)), precision)


def log_mel(
    batch: mx.array | np.ndarray,
    filterbank: str = "slaney",
    config: FeatureConfig | None = None,
    precision: str = "float32",
) -> mx.array:
    """Log-mel (B, 1 + N // hop, n_mels) in dB of (B, N) or (N,) float waveforms, as float32.

    `filterbank="slaney"` is the unfused/`rand_trunc` path (librosa mel), `"htk"` the fused path
    (torchaudio mel). `config` gives rates and band edges (default: the hub CLAP settings).
    `precision="float64"` computes the STFT in float64 on the CPU (see `MelFrontend`).
    """
    cfg = config or FeatureConfig()
    return _frontend_for(tuple(sorted(cfg.to_dict().items())), precision).log_mel(batch, filterbank)


# ------------------------------------------------------------------------------------- the extractor


class ClapFeatureExtractor:
    """MLX drop-in for transformers' `ClapFeatureExtractor`: waveforms -> (input_features, is_longer).

    The config uses the hub `preprocessor_config.json` field names (`frequency_min`, `truncation`, ...).
    """

    def __init__(self, config: FeatureConfig | dict | None = None, *, precision: str = "float32"):
        """`precision`: "float32" (MLX rfft, any device) or "float64" (CPU; see `MelFrontend`)."""
        if config is None:
            config = FeatureConfig()
        elif isinstance(config, dict):
            config = FeatureConfig.from_dict(config)
        if config.top_db is not None:
            raise ValueError("top_db is not supported (every CLAP hub config has top_db: null)")
        if config.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {config.padding!r}")
        if config.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, not {config.truncation!r}")
        self.config = config
        self.frontend = MelFrontend(config, precision)
        # Build (and validate: fmax <= sr / 2) both filterbanks now, not on the first call.
        self.frontend.filterbank("slaney")
        self.frontend.filterbank("htk")

    @property
    def max_samples(self) -> int:
        """Samples per model input (480000: 10 s at 48 kHz)."""
        return self.config.nb_max_samples

    @property
    def chunk_frames(self) -> int:
        """Mel frames per model input (1001 = 480000 // 480 + 1)."""
        return self.config.nb_max_frames

    def _check_rate(self, sampling_rate: int | None) -> None:
        if sampling_rate is not None and int(sampling_rate) != int(self.config.sampling_rate):
            raise AudioInputError(
                f"sampling_rate {sampling_rate} Hz does not match the model's "
                f"{self.config.sampling_rate} Hz; resample the audio first "
                "(mlx_clap.preprocess.audio.load_audio does)"
            )

    def _fusion_stack(self, mel: mx.array, picks: Sequence[int]) -> mx.array:
        """(T, n_mels) whole-clip HTK mel + 3 chunk starts -> (4, chunk_frames, n_mels)."""
        total = mel.shape[0]
        chunk = self.chunk_frames
        i0, i1, w1 = bilinear_shrink_weights(total, chunk)
        w1m = mx.array(w1)[:, None]
        shrink = (1.0 - w1m) * mel[mx.array(i0)] + w1m * mel[mx.array(i1)]
        chunks = [mel[int(s) : int(s) + chunk] for s in picks]
        return mx.stack([shrink, *chunks], axis=0)

    def _features(
        self, waves: list[np.ndarray], truncation: str, padding: str, picker, compat_draw
    ) -> tuple[mx.array, list[bool]]:
        """Crop/pad/fuse every item and compute its mel; `picker(ranges)` chooses fusion chunk starts."""
        max_len, hop = self.max_samples, self.config.hop_length
        fused = truncation == "fusion"
        fb = "htk" if fused else "slaney"
        fixed: list[np.ndarray] = []  # waveforms of exactly max_len samples, computed in one batch
        slots: list[tuple[str, Any]] = []
        longer: list[bool] = []
        for w in waves:
            n = w.shape[0]
            if n <= max_len:
                slots.append(("fixed", len(fixed)))
                fixed.append(pad_waveform(w, max_len, padding))
                longer.append(False)
            elif fused:
                total = n // hop + 1
                if total == self.chunk_frames:
                    # 480000 < N < 480480: the whole clip is exactly one chunk (docs/numerics.md §3.2 step 3).
                    slots.append(("whole", (w, None)))
                    longer.append(False)
                else:
                    picks = [int(p) for p in picker(fusion_ranges(total, self.chunk_frames))]
                    slots.append(("whole", (w, picks)))
                    longer.append(True)
                if compat_draw is not None:
                    compat_draw(n - max_len + 1)
            else:
                start = picker(n - max_len + 1)
                slots.append(("fixed", len(fixed)))
                fixed.append(w[start : start + max_len])
                longer.append(True)
        fixed_mel = self.frontend.log_mel(fixed, fb) if fixed else None
        rows = []
        for kind, data in slots:
            if kind == "fixed":
                mel = fixed_mel[data]
                rows.append(mx.stack([mel] * FUSION_CHANNELS) if fused else mel[None])
            else:
                w, picks = data
                mel = self.frontend.log_mel(w, fb)[0]
                rows.append(
                    mx.stack([mel] * FUSION_CHANNELS) if picks is None else self._fusion_stack(mel, picks)
                )
        return mx.stack(rows), longer

    def __call__(
        self,
        raw_speech: np.ndarray | Sequence[np.ndarray],
        *,
        truncation: str | None = None,
        padding: str | None = None,
        sampling_rate: int | None = None,
        rng: np.random.RandomState | None = None,
        quantize_int16: bool = False,
        fused_short: str = "laion",
        laion_compat_draw: bool = False,
    ) -> tuple[mx.array, mx.array]:
        """Featurize one 1-D float32 waveform or a list of them (48 kHz mono).

        Returns `input_features` (B, C, 1001, 64) float32 (C = 4 for `fusion`, else 1) and `is_longer`
        (B, 1) bool. Random draws use numpy's global legacy RNG in HF's order (or `rng`):
        `rand_trunc` draws one `randint` per long clip; `fusion` three `choice`s per long clip (plus LAION's
        compatibility `randint` with `laion_compat_draw=True`); with `fused_short="hf"`, a batch where no
        clip is longer gets one random clip flagged longer (HF), while `"laion"` leaves all False.
        `truncation` may also be the deterministic "head" / "center" crops (C = 1, Slaney mel).
        `quantize_int16` applies LAION's int16 round trip first.
        """
        self._check_rate(sampling_rate)
        truncation = truncation or self.config.truncation
        padding = padding or self.config.padding
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, not {truncation!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
        if fused_short not in ("laion", "hf"):
            raise ValueError(f"fused_short must be 'laion' or 'hf', not {fused_short!r}")
        waves = as_waveform_list(raw_speech)
        if quantize_int16:
            waves = [_quantize(w) for w in waves]
        draw = rng if rng is not None else np.random

        if truncation == "rand_trunc":

            def picker(arg):
                return int(draw.randint(0, arg))

        elif truncation == "fusion":

            def picker(ranges):
                return [draw.choice(r) for r in ranges]

        elif truncation == "head":

            def picker(arg):
                return 0

        else:

            def picker(arg):
                return (arg - 1) // 2

        compat = (
            (lambda high: draw.randint(0, high)) if laion_compat_draw and truncation == "fusion" else None
        )
        feats, longer = self._features(waves, truncation, padding, picker, compat)
        if truncation == "fusion" and fused_short == "hf" and not any(longer):
            longer[int(draw.randint(0, len(longer)))] = True
        return feats, mx.array(np.array(longer, dtype=bool)[:, None])

    def fusion_features(self, waves: Sequence[np.ndarray]) -> tuple[mx.array, mx.array]:
        """The 4-channel fusion input with deterministic picks (the middle start of each third), for a
        fused config only: the "fusion" long-audio mode."""
        if self.config.truncation != "fusion":
            raise ValueError(
                "long_audio='fusion' needs a fused model (feature config truncation 'fusion'); "
                f"this one uses {self.config.truncation!r}"
            )

        def middle(ranges: list[np.ndarray]) -> list[int]:
            return [r[len(r) // 2] for r in ranges]

        feats, longer = self._features(list(waves), "fusion", self.config.padding, middle, None)
        return feats, mx.array(np.array(longer, dtype=bool)[:, None])

    def window_features(self, clips: Sequence[np.ndarray]) -> tuple[mx.array, mx.array]:
        """Model inputs for clips of at most one window (checked 1-D float32), one row each.

        Short clips are filled with the config's padding; a fused config gets 4 copies of the HTK mel
        with is_longer False (docs/numerics.md §3.3).
        """
        max_len = self.max_samples
        segments = [pad_waveform(c, max_len, self.config.padding) for c in clips]
        fused = self.config.truncation == "fusion"
        fb = "htk" if fused else "slaney"
        # Stack a few windows at a time: an hour of audio is 360 windows (690 MB as one float32 batch).
        group = max(1, MAX_FRAMES_PER_BLOCK // self.chunk_frames)
        parts = []
        for i in range(0, len(segments), group):
            parts.append(self.frontend.log_mel(segments[i : i + group], fb))
            if len(segments) > group:
                mx.eval(parts[-1])  # frees this group's waveforms before the next is stacked
        mel = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0))[:, None]
        if fused:
            mel = mx.repeat(mel, FUSION_CHANNELS, axis=1)
        return mel, mx.zeros((mel.shape[0], 1), dtype=mx.bool_)

    def extract_for_embedding(
        self,
        waveforms: np.ndarray | Sequence[np.ndarray],
        *,
        long_audio: str = "windows-mean",
        seed: int | None = None,
        quantize_int16: bool = False,
    ) -> tuple[mx.array, mx.array, np.ndarray]:
        """Model inputs for embedding: (features (R, C, 1001, 64), is_longer (R, 1), owner (R,) int64).

        Row r belongs to item `owner[r]`; callers average the unit embeddings of an item's rows.
        Clips up to 10 s always give one padded row. Past 10 s, `long_audio` decides:

        - "windows-mean": consecutive 10-s windows from 0 with a 10-s hop; a remainder adds one last
          window aligned to the end, so every window is full and every sample is covered;
        - "head" / "center": the first / middle 10 s;
        - "fusion": the 4-channel fusion input with deterministic picks (the middle start of each third);
          only for a config whose truncation is "fusion";
        - "reference": the config's own truncation with its random draws, from
          `np.random.RandomState(seed)`, or from numpy's global RNG when `seed` is None (replayable
          with `np.random.seed`). Fused short clips follow LAION (is_longer False).

        With a fused config every mode gives 4 channels: windows are 4 copies of their HTK mel,
        is_longer False. Deterministic in every mode but "reference".
        """
        if long_audio not in LONG_AUDIO_MODES:
            raise ValueError(f"long_audio must be one of {LONG_AUDIO_MODES}, not {long_audio!r}")
        waves = as_waveform_list(waveforms)
        if quantize_int16:
            waves = [_quantize(w) for w in waves]
        n_items = len(waves)
        if long_audio == "reference":
            rng = np.random.RandomState(seed) if seed is not None else None
            feats, longer = self(waves, rng=rng)
            return feats, longer, np.arange(n_items, dtype=np.int64)
        if long_audio == "fusion":
            feats, longer = self.fusion_features(waves)
            return feats, longer, np.arange(n_items, dtype=np.int64)

        max_len = self.max_samples
        segments: list[np.ndarray] = []
        owner: list[int] = []
        for i, w in enumerate(waves):
            for clip in clip_windows(w, max_len, long_audio):
                segments.append(clip)
                owner.append(i)
        mel, is_longer = self.window_features(segments)
        return mel, is_longer, np.array(owner, dtype=np.int64)


__all__ = [
    "AMIN",
    "AudioInputError",
    "ClapFeatureExtractor",
    "MelFrontend",
    "as_waveform_list",
    "bilinear_shrink_weights",
    "fusion_ranges",
    "hz_to_mel",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "pad_waveform",
    "periodic_hann",
    "quantize_int16",
]
