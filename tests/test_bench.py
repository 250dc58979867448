"""`dynavit bench`: SPEC parsing, interleaved timing, the JSON schema of the issue, train mode, memory, reducer share.

Tiny models and one or two timed rounds only: these tests check the measuring machinery, not speed.
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from dynavit import registry, timing
from dynavit.bench import BenchConfig, Spec, parse_spec, resolve, run_benchmark, validate
from dynavit.cli import main
from dynavit.errors import ConfigError, UnknownNameError
from dynavit.reduction import TokenReducer
from dynavit.tokens import select_tokens

MACHINE_KEYS = {"device", "threads", "torch", "dtype", "batch_size"}
RESULT_KEYS = {"method", "gmacs", "img_per_s", "latency_ms_b1", "peak_mem_mb", "speedup", "ideal_speedup",
               "efficiency"}


class _HalveAt3(TokenReducer):
    """A stand-in method: after block 3's attention keep the top keep_rate of tokens by class attention."""

    name = "fake_topk"

    def __init__(self, keep_rate):
        self.keep_rate = keep_rate

    def attention_args(self, i, state):
        return {"need_cls_attn": i == 3}

    def after_attention(self, model, i, state, cls_attn, keys):
        if i != 3:
            return state
        k = int(self.keep_rate * state.num_tokens)
        keep = cls_attn[:, state.num_prefix:].topk(k, dim=1).indices  # (B, k)
        return select_tokens(state, keep)


def _apply(model, keep_rate=0.5):
    model.reducer = _HalveAt3(keep_rate)
    return model


@pytest.fixture
def fake_method(monkeypatch):
    registry.list_methods()  # load the real ones first
    spec = registry.MethodSpec("fake_topk", ("keep_rate",), apply=_apply, families=("vit",))
    monkeypatch.setitem(registry._METHODS, "fake_topk", spec)
    return "fake_topk"


# ------------------------------------------------------------------------------------------- SPEC
def test_parse_spec_values_and_options(fake_method):
    assert parse_spec("dense") == Spec("dense", None, {})
    assert parse_spec("fake_topk:0.7") == Spec("fake_topk:0.7", "fake_topk", {"keep_rate": 0.7})
    assert parse_spec(" FAKE_TOPK:0.5 ").kwargs == {"keep_rate": 0.5}
    assert parse_spec("fake_topk,keep_rate=0.25").kwargs == {"keep_rate": 0.25}


@pytest.mark.parametrize("text, match", [("fake_topk:1.5", "1.5"), ("fake_topk:0", "0"), ("fake_topk:abc", "abc"),
                                         ("fake_topk:", "empty"), ("dense:3", "dense"),
                                         ("fake_topk:0.7,colour=3", "colour"), ("fake_topk:0.7,oops", "oops")])
def test_parse_spec_rejects_bad_values_naming_them(fake_method, text, match):
    with pytest.raises(ConfigError, match=match):
        parse_spec(text)


def test_parse_spec_unknown_method_suggests(fake_method):
    with pytest.raises(UnknownNameError, match="fake_topk"):
        parse_spec("fake_topc:0.7")


def test_known_value_meanings():
    """VALUE sets each spec's primary parameter; values are validated by building the model on the meta device."""
    for name, spec in registry.list_methods().items():
        assert parse_spec(f"{name}:1").kwargs == {spec.primary: 1}
    assert parse_spec("tome:13").kwargs == {"r": 13}
    assert parse_spec("dynamicvit:0.7").kwargs == {"keep_rate": 0.7}
    with pytest.raises(ConfigError, match="1.5"):
        validate(resolve(parse_spec("tome:1.5"), "tiny_vit"))
    with pytest.raises(ConfigError, match="1.5"):  # before any model is built or timed
        run_benchmark(BenchConfig(model="tiny_vit", specs=["tome:1.5"]))
    # DiT is a model family: dit:B builds the DiT twin, dense the PVTv2 twin
    assert parse_spec("dit:0.5").kwargs == {"budget": 0.5}
    assert resolve(parse_spec("dit:0.5"), "pvt_v2_b0") == ("dit_b0", None, {"budget": 0.5})
    assert resolve(parse_spec("dit:0.5"), "dit_b0") == ("dit_b0", None, {"budget": 0.5})
    assert resolve(parse_spec("dense"), "dit_b1") == ("pvt_v2_b1", None, {})
    with pytest.raises(ConfigError, match="budget"):
        validate(resolve(parse_spec("dit:1.5"), "dit_b0"))
    with pytest.raises(ConfigError, match="tiny_vit"):
        resolve(parse_spec("dit:0.5"), "tiny_vit")


# ------------------------------------------------------------------------------------------- measuring
def test_time_interleaved_runs_a_b_a_b_and_discards_warmup():
    calls = []
    steps = [lambda: calls.append("A"), lambda: calls.append("B")]
    times = timing.time_interleaved(steps, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["A", "B"] * 4
    assert [len(t) for t in times] == [3, 3]


def test_logits_of_finds_the_logits():
    logits = torch.randn(4, 10)
    assert timing.logits_of(logits, 4) is logits
    assert timing.logits_of((torch.randn(4, 7, 2), logits), 4) is logits
    with pytest.raises(TypeError):
        timing.logits_of((torch.randn(3, 10),), 4)


def test_peak_memory_grows_with_batch():
    import dynavit

    model = dynavit.create_model("tiny_vit").eval()
    cpu = torch.device("cpu")
    small = timing.peak_memory_mb(timing.make_step(model, torch.randn(1, 3, 224, 224), False), cpu)
    large = timing.peak_memory_mb(timing.make_step(model, torch.randn(8, 3, 224, 224), False), cpu)
    assert 0 < small < large


def _check_schema(report, specs):
    assert MACHINE_KEYS <= set(report["machine"])
    assert [r["method"] for r in report["results"]] == specs
    for r in report["results"]:
        assert RESULT_KEYS <= set(r)
        assert r["img_per_s"] > 0 and r["gmacs"] > 0 and r["peak_mem_mb"] >= 0
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"], abs=2e-3)
        rounds = [d / t for d, t in zip(report["results"][0]["times_s"], r["times_s"])]
        assert r["speedup_paired"] == pytest.approx(statistics.median(rounds), abs=1e-4)  # median of the pairs
    dense = report["results"][0]
    assert dense["speedup"] == dense["ideal_speedup"] == dense["efficiency"] == dense["speedup_paired"] == 1.0


def test_run_benchmark_side_by_side(fake_method):
    cfg = BenchConfig(model="tiny_vit", specs=["fake_topk:0.5"], img_size=64, batch_size=2, repeats=2, warmup=1, b1_repeats=2,
                      reducer_share=True)
    report = run_benchmark(cfg)
    _check_schema(report, ["dense", "fake_topk:0.5"])  # dense is added first
    dense, fake = report["results"]
    assert fake["ideal_speedup"] > 1.2 and fake["gmacs"] < dense["gmacs"]
    assert fake["latency_ms_b1"] > 0 and 0 < fake["reducer_share"] < 1 and dense["reducer_share"] is None
    assert report["machine"]["mode"] == "inference" and report["machine"]["batch_size"] == 2
    assert report["machine"]["malloc_tunables"] in (True, False)


def test_run_benchmark_train_mode(fake_method):
    cfg = BenchConfig(model="tiny_vit", specs=["dense", "fake_topk:0.5"], img_size=64, batch_size=2, repeats=1, warmup=1,
                      train=True)
    report = run_benchmark(cfg)
    _check_schema(report, ["dense", "fake_topk:0.5"])
    dense, fake = report["results"]
    assert report["machine"]["mode"] == "train" and dense["latency_ms_b1"] is None
    # a training step costs about 3 forwards
    import dynavit
    from dynavit.flops import count_gmacs

    fwd = count_gmacs(dynavit.create_model("tiny_vit", img_size=64))
    assert 2.5 * fwd < dense["gmacs"] < 3.5 * fwd and fake["gmacs"] < dense["gmacs"]


def test_bad_config_fails_before_building():
    with pytest.raises(ConfigError, match="float8"):
        run_benchmark(BenchConfig(model="tiny_vit", specs=["dense"], dtype="float8"))
    with pytest.raises(ConfigError, match="threads"):
        run_benchmark(BenchConfig(model="tiny_vit", specs=["dense"], threads=0, repeats=1))


def test_bench_cli_writes_the_issue_schema(tmp_path, capsys, fake_method):
    out = tmp_path / "out.json"
    rc = main(["bench", "--model", "tiny_vit", "--method", "dense", "--method", "fake_topk:0.5", "--batch-size", "2", "--img-size", "64",
               "--repeats", "1", "--warmup", "0", "--b1-repeats", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    _check_schema(report, ["dense", "fake_topk:0.5"])
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| fake_topk:0.5 |" in printed


def test_bench_cli_b1_repeats_zero_skips_the_latency(tmp_path, fake_method):
    """`--b1-repeats 0` is what its help says: no batch-1 rounds (it was refused as below 1)."""
    out = tmp_path / "out.json"
    rc = main(["bench", "--model", "tiny_vit", "--method", "dense", "--method", "fake_topk:0.5", "--batch-size", "2",
               "--img-size", "64", "--repeats", "1", "--warmup", "0", "--b1-repeats", "0", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["latency_ms_b1"] for r in rows] == [None, None]


def test_bench_cli_bad_spec_is_one_line_error(capsys, fake_method):
    assert main(["bench", "--model", "tiny_vit", "--method", "fake_topk:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynavit: error:") and "2" in err
