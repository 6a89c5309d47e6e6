"""The CLI with a Microsoft CLAP folder: `info` describes it, `classify` prompts the way msclap does, and
`convert --family auto` takes only Microsoft's file names for msclap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tokenizers")
from test_msclap_api import folder, signal  # noqa: E402,F401  (the tiny msclap folder fixture)

from mlx_clap.cli import main  # noqa: E402


def test_info_describes_a_msclap_folder(folder):  # noqa: F811
    r = CliRunner().invoke(main, ["info", "--model", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["model"]
    assert "error" not in m, m
    assert m["family"] == "msclap" and m["sampling_rate"] == 44100 and m["tokenizer"] is True
    assert m["template"] == "this is the sound of {}"
    r = CliRunner().invoke(main, ["info", "--model", str(folder)])
    assert r.exit_code == 0 and "not loadable" not in r.output and "msclap" in r.output


def test_info_exits_1_when_the_model_does_not_load(tmp_path):
    r = CliRunner().invoke(main, ["info", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "not loadable" in r.output


def test_classify_uses_the_msclap_prompt(folder, tmp_path):  # noqa: F811
    import soundfile as sf

    import mlx_clap

    path = tmp_path / "clip.wav"
    sf.write(path, signal(3.0, seed=3), 44100)
    labels = ["dog", "rain", "siren"]
    r = CliRunner().invoke(
        main, ["classify", str(path), "--labels", ",".join(labels), "--model", str(folder), "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["template"] == "this is the sound of {}"
    model = mlx_clap.load(folder)
    want = model.classify(path, labels, template="this is the sound of {}")[0]
    laion = model.classify(path, labels, template="This is a sound of {}.")[0]
    got = np.array([out["results"][0]["probs"][k] for k in labels])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want - laion).max() > 1e-6, "the two templates should give different probabilities"


def test_convert_family_auto_takes_msclap_only_for_microsoft_names(tmp_path):
    torch = pytest.importorskip("torch")
    laion_named = tmp_path / "my-laion-finetune.pth"
    torch.save({"state_dict": {"module.x": torch.zeros(2)}}, laion_named)
    r = CliRunner().invoke(main, ["convert", str(laion_named), str(tmp_path / "a")])
    assert r.exit_code != 0 and "not a LAION-CLAP" in r.output, r.output
    ms_named = tmp_path / "CLAP_weights_2023.pth"
    torch.save({"model": {"x": torch.zeros(2)}}, ms_named)
    r = CliRunner().invoke(main, ["convert", str(ms_named), str(tmp_path / "b")])
    assert r.exit_code != 0 and "not a msclap" in r.output, r.output
    r = CliRunner().invoke(main, ["convert", str(laion_named), str(tmp_path / "c"), "--family", "msclap"])
    assert r.exit_code != 0 and "{'model': state_dict}" in r.output, r.output  # the msclap converter ran
