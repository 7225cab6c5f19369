"""Drift monitoring without a proxy: profiles, PSI/KS against a numpy reference, bad data, the monitor."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from shadowproxy.commands.cli import main
from shadowproxy.config import CompareConfig, DriftConfig
from shadowproxy.drift import monitor as drift_module
from shadowproxy.drift.monitor import DriftMonitor
from shadowproxy.drift.profile import build_profile, extract_instances, load_profile
from shadowproxy.errors import ConfigError
from tests.drift_data import (
    BASE,
    BASE_ROWS,
    COLOR_P,
    COLORS,
    bodies,
    feed,
    monitor,
    record,
    ref_categorical_psi,
    ref_edges,
    ref_psi_ks,
    rows_of,
    synthetic,
)

# --- the monitor against the reference ---------------------------------------------------------------


def test_traffic_from_the_baseline_distribution_stays_under_psi_005(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS)
    doc = feed(m, bodies(rows_of(synthetic(10000, seed=2))))
    assert doc["window"] == 10000
    assert set(doc["features"]) == {"age", "income", "score", "color"}
    for name, figures in doc["features"].items():
        assert figures["psi"] < 0.05, name
        assert figures["status"] == "ok"


def test_half_a_standard_deviation_shift_in_one_feature_shows_only_there(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS)
    shift = 0.5 * float(np.std(BASE["score"]))
    doc = feed(m, bodies(rows_of(synthetic(10000, seed=3, shift=shift))))
    features = doc["features"]
    assert features["score"]["psi"] > 0.1
    assert features["score"]["status"] in ("warn", "alert")
    for name in ("age", "income", "color"):
        assert features[name]["psi"] < 0.05, name


def test_a_new_category_shows_in_the_categorical_feature(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS)
    doc = feed(m, bodies(rows_of(synthetic(10000, seed=4, new_color=0.2))))
    color = doc["features"]["color"]
    assert color["psi"] >= 0.25 and color["status"] == "alert"
    assert color["ks"] is None  # KS is for numeric features
    assert doc["features"]["age"]["psi"] < 0.05


def test_psi_and_ks_equal_a_numpy_reference_over_the_sliding_window(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS, window=4000)
    live = synthetic(9000, seed=5, shift=0.05, new_color=0.05)
    doc = feed(m, bodies(rows_of(live), per_request=700))
    assert doc["window"] == 4000
    for name in ("age", "income", "score"):
        expected_psi, expected_ks = ref_psi_ks(BASE[name], live[name][-4000:])
        assert doc["features"][name]["psi"] == pytest.approx(expected_psi, abs=1e-9), name
        assert doc["features"][name]["ks"] == pytest.approx(expected_ks, abs=1e-9), name
    expected = ref_categorical_psi(BASE["color"], live["color"][-4000:])
    assert doc["features"]["color"]["psi"] == pytest.approx(expected, abs=1e-9)


def test_missing_and_invalid_values_are_counted_per_feature(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS)
    instances = [
        {"age": 30.0, "income": 1e4, "score": 0.5, "color": "red"},
        {"age": None, "income": "lots", "score": 0.5, "color": 7},  # null, string in numeric, number in categorical
        {"income": [1, 2], "score": True, "color": "blue"},  # absent, a list, a boolean in numeric
    ]
    doc = feed(m, [orjson.dumps({"instances": instances}), b"not json", b'{"no": "instances"}'])
    f = doc["features"]
    assert (f["age"]["missing"], f["age"]["invalid"]) == (2, 0)
    assert (f["income"]["missing"], f["income"]["invalid"]) == (0, 2)
    assert (f["score"]["missing"], f["score"]["invalid"]) == (0, 1)
    assert (f["color"]["missing"], f["color"]["invalid"]) == (0, 1)
    assert doc["unparseable"] == 2
    assert doc["window"] == 3
    assert f["age"]["count"] == 1


def test_list_instances_take_the_vectorised_path_with_the_same_figures_as_named_rows(tmp_path: Path) -> None:
    # kserve-v1 list instances are binned a batch at a time (numpy); dict rows value by value where
    # anything is off. Both must give the reference figures and the same missing/invalid counts.
    names = ("age", "income", "score")
    base_rows = [{f"f{k}": row[name] for k, name in enumerate(names)} for row in BASE_ROWS]
    live = synthetic(6000, seed=9, shift=0.1)
    as_lists = [[float(live[name][i]) for name in names] for i in range(6000)]
    as_dicts = [{f"f{k}": v for k, v in enumerate(row)} for row in as_lists]
    listed, named = monitor(tmp_path, base_rows, window=5000), monitor(tmp_path, base_rows, window=5000)
    ints = [[30, 10000, 0] for _ in range(7)]  # JSON integers are numbers too
    doc_lists = feed(listed, bodies(as_lists[:3000], 300) + bodies(ints) + bodies(as_lists[3000:], 300))
    doc_dicts = feed(named, bodies(as_dicts[:3000], 300)
                     + bodies([{f"f{k}": v for k, v in enumerate(r)} for r in ints]) + bodies(as_dicts[3000:], 300))
    assert doc_lists["features"] == doc_dicts["features"]
    assert doc_lists["window"] == 5000
    for k, name in enumerate(names):
        sent = np.concatenate([live[name][:3000], [float(r[k]) for r in ints], live[name][3000:]])
        expected_psi, expected_ks = ref_psi_ks(BASE[name], sent[-5000:])
        assert doc_lists["features"][f"f{k}"]["psi"] == pytest.approx(expected_psi, abs=1e-9)
        assert doc_lists["features"][f"f{k}"]["ks"] == pytest.approx(expected_ks, abs=1e-9)
    # the lists in one numpy call; the dicts not
    assert (listed.list_batches_vectorised, listed.list_batches_by_value) == (1, 0)
    assert (named.list_batches_vectorised, named.list_batches_by_value) == (0, 1)
    # A batch with booleans, strings, nulls and short rows falls back to value-by-value checks.
    odd = [[True, 1.0, 0.5], ["x", None, 0.5], [31.0], [32.0, 20000.0, 0.25, "extra"], [33.0, 1e4, 0.75]]
    doc_lists = feed(listed, [orjson.dumps({"instances": odd})])
    doc_dicts = feed(named, [orjson.dumps({"instances": [{f"f{k}": v for k, v in enumerate(r)} for r in odd]})])
    assert doc_lists["features"] == doc_dicts["features"]
    f = doc_lists["features"]
    assert (f["f0"]["invalid"], f["f1"]["missing"], f["f2"]["missing"]) == (2, 2, 1)
    assert (listed.list_batches_vectorised, listed.list_batches_by_value) == (1, 1)


def test_workers_drift_documents_merge_into_what_one_monitor_sees(tmp_path: Path) -> None:
    # `serve --workers N` with a baseline file: each worker watches its share of the traffic; the
    # supervisor adds up their window counts. Merged == one monitor fed everything == the reference.
    profile_path = tmp_path / "baseline.json"
    base_doc = build_profile(BASE_ROWS, predictions=[int(x) for x in np.random.default_rng(3).random(2000) < 0.3])
    profile_path.write_bytes(orjson.dumps(base_doc.to_json()))
    live = synthetic(6000, seed=10, shift=0.3)
    rows = rows_of(live)
    rows[5]["age"] = None  # a missing value, counted where it arrived
    payloads = bodies(rows, per_request=200)
    answers = [orjson.dumps({"predictions": [i % 2] * 200}) for i in range(len(payloads))]
    one, first, second = (monitor(tmp_path, None, baseline=str(profile_path)) for _ in range(3))
    feed(one, payloads, answers)
    feed(first, payloads[::2], answers[::2])
    feed(second, payloads[1::2], answers[1::2])
    docs = [{**m.snapshot(), "state": m.window_counts()} for m in (first, second)]
    merged = drift_module.merge_snapshots(docs, load_profile(profile_path))
    alone = one.snapshot()
    assert merged["workers"] == 2 and merged["window"] == alone["window"] == 6000
    for name, figures in alone["features"].items():
        for key in ("status", "missing", "invalid", "count", "kind"):
            assert merged["features"][name][key] == figures[key], (name, key)
        assert merged["features"][name]["psi"] == pytest.approx(figures["psi"], abs=1e-12), name
        if figures["ks"] is not None:
            assert merged["features"][name]["ks"] == pytest.approx(figures["ks"], abs=1e-12), name
    expected_psi, expected_ks = ref_psi_ks(BASE["score"], live["score"])
    assert merged["features"]["score"]["psi"] == pytest.approx(expected_psi, abs=1e-9)
    assert merged["features"]["score"]["ks"] == pytest.approx(expected_ks, abs=1e-9)
    assert merged["features"]["age"]["missing"] == 1
    assert merged["predictions"]["psi"] == pytest.approx(alone["predictions"]["psi"], abs=1e-12)
    assert merged["predictions"]["window"] == alone["predictions"]["window"] == 6000
    assert merged["watched"] == alone["watched"]


def test_warmup_learns_the_baseline_from_the_first_instances(tmp_path: Path) -> None:
    m = monitor(tmp_path, None, warmup=5000, window=5000)
    doc = feed(m, bodies(BASE_ROWS[:4000]))
    assert doc["warming_up"] is True and doc["features"] == {} and doc["window"] == 0
    live = synthetic(5000, seed=6, shift=0.2)
    doc = feed(m, bodies(BASE_ROWS[4000:5000]) + bodies(rows_of(live)))
    assert doc["warming_up"] is False and doc["window"] == 5000
    expected_psi, expected_ks = ref_psi_ks(BASE["score"][:5000], live["score"])
    assert doc["features"]["score"]["psi"] == pytest.approx(expected_psi, abs=1e-9)
    assert doc["features"]["score"]["ks"] == pytest.approx(expected_ks, abs=1e-9)


def test_feature_names_are_capped_at_max_features_and_filtered_by_features(tmp_path: Path) -> None:
    capped = monitor(tmp_path, None, warmup=10, max_features=2)
    wide = [{f"x{i}": 1.0 for i in range(50)} for _ in range(20)]
    assert list(feed(capped, bodies(wide))["features"]) == ["x0", "x1"]
    chosen = monitor(tmp_path, BASE_ROWS, features=("color",))
    assert list(feed(chosen, bodies(BASE_ROWS[:100]))["features"]) == ["color"]


def test_label_predictions_drift_against_their_warmup_baseline(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS, warmup=2000, window=2000)
    request = orjson.dumps({"instances": BASE_ROWS[:100]})
    rng = np.random.default_rng(7)
    before = [orjson.dumps({"predictions": [int(x) for x in rng.random(100) < 0.1]}) for _ in range(20)]
    after = [orjson.dumps({"predictions": [int(x) for x in rng.random(100) < 0.5]}) for _ in range(20)]
    doc = feed(m, [request] * 40, before + after)
    predictions = doc["predictions"]
    assert predictions["window"] == 2000 and predictions["status"] == "alert"
    live = [p for answer in after for p in orjson.loads(answer)["predictions"]]
    base = [p for answer in before for p in orjson.loads(answer)["predictions"]]
    expected = ref_categorical_psi([str(p) for p in base], [str(p) for p in live])
    assert predictions["psi"] == pytest.approx(expected, abs=1e-9)


def test_one_element_numeric_predictions_are_watched_as_their_number(tmp_path: Path) -> None:
    # A regressor's output of shape (n, 1) answers [[0.7], [0.2], ...]: one number per instance.
    path = tmp_path / "baseline.json"
    path.write_bytes(orjson.dumps(build_profile(BASE_ROWS).to_json()))
    rng = np.random.default_rng(11)
    scores = [rng.normal(0.0, 1.0, 100).round(6).tolist() for _ in range(20)] + [
        rng.normal(0.5, 1.0, 100).round(6).tolist() for _ in range(20)
    ]
    request = orjson.dumps({"instances": BASE_ROWS[:100]})
    docs = []
    for wrap in (False, True):
        m = DriftMonitor(DriftConfig(baseline=str(path), warmup=2000, window=2000), CompareConfig(kind="numeric"))
        answers = [orjson.dumps({"predictions": [[v] for v in batch] if wrap else batch}) for batch in scores]
        docs.append(feed(m, [request] * len(scores), answers)["predictions"])
    plain, wrapped = docs
    assert plain["window"] == 2000 and plain["psi"] is not None and plain["kind"] == "numeric"
    assert wrapped == plain
    # And so for a profile built from answers.
    flat = scores[0]
    assert build_profile(BASE_ROWS[:10], predictions=[[v] for v in flat]).to_json() == build_profile(
        BASE_ROWS[:10], predictions=flat
    ).to_json()


def test_only_wanted_records_count_and_a_full_queue_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = monitor(tmp_path, BASE_ROWS)
    m.on_exchange(record(orjson.dumps({"instances": BASE_ROWS[:10]})), wanted=False)
    assert m.snapshot()["window"] == 0
    monkeypatch.setattr("shadowproxy.drift.monitor.QUEUE_RECORDS", 2)
    doc = feed(m, [orjson.dumps({"instances": BASE_ROWS[:10]})] * 3)
    assert (doc["window"], doc["dropped"]) == (20, 1)
    never = monitor(tmp_path, BASE_ROWS, sample_rate=0.0)
    assert not any(never.wants_bodies() for _ in range(100))


def test_queued_bytes_return_to_zero_so_the_byte_cap_keeps_holding(tmp_path: Path) -> None:
    m = monitor(tmp_path, BASE_ROWS)
    body = orjson.dumps({"instances": BASE_ROWS[:3]})
    answers = [b'{"predictions":[1,0,1]}', None, b'{"predictions":[0,0,0]}']
    for round_ in range(5):
        for i in range(30):
            m.on_exchange(record(body, answers[i % 3]), wanted=True)
        assert m.queued_bytes == 30 * len(body) + 10 * (len(answers[0]) + len(answers[2]))  # type: ignore[arg-type]
        assert m.process(7 + round_) == 7 + round_  # a part of the queue, then the rest
        m.process()
        assert m.queued_bytes == 0


def test_a_bad_baseline_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="drift.baseline"):
        DriftMonitor(DriftConfig(baseline=str(path)), CompareConfig())
    with pytest.raises(ConfigError, match="drift.features"):
        monitor(tmp_path, BASE_ROWS, features=("nope",))


def test_predictions_are_not_watched_under_the_openai_preset() -> None:
    # compare.kind is ignored there, and generated text is no label distribution.
    assert DriftMonitor(DriftConfig(), CompareConfig(preset="openai")).predictions is None
    assert DriftMonitor(DriftConfig(), CompareConfig(preset="kserve-v1")).predictions is not None


def test_instances_per_preset() -> None:
    assert extract_instances({"instances": [[1, "a"]], "feature_names": ["x", "y"]}, "kserve-v1") == [
        {"x": 1, "y": "a"}
    ]
    assert extract_instances({"instances": [[1, 2], 3]}, "tf-serving") == [{"f0": 1, "f1": 2}, {"f0": 3}]
    split = {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}
    assert extract_instances(split, "mlflow") == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert extract_instances({"inputs": {"a": [1, 2]}}, "mlflow") == [{"a": 1}, {"a": 2}]
    oip = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
                      {"name": "c", "shape": [2], "datatype": "BYTES", "data": ["u", "v"]}]}
    assert extract_instances(oip, "oip-v2") == [
        {"x[0]": 1, "x[1]": 2, "c[0]": "u"},
        {"x[0]": 3, "x[1]": 4, "c[0]": "v"},
    ]


# --- the profile command -----------------------------------------------------------------------------


def test_profile_command_writes_deciles_and_category_shares_from_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join(bodies(BASE_ROWS, per_request=1000)) + b"\nnot json\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b'{"predictions": [0, 1, 1, 1]}\n')
    out = tmp_path / "baseline.json"
    code = main(["profile", str(data), "--preset", "kserve-v1", "-o", str(out), "--predictions", str(answers),
                 "--prediction-kind", "label"])
    assert code == 0
    profile = load_profile(out)
    age = profile.features["age"]
    assert age.kind == "numeric" and len(age.edges) == 9
    np.testing.assert_allclose(age.edges, ref_edges(BASE["age"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(age.shares, np.full(10, 0.1), atol=1e-9)
    color = profile.features["color"]
    assert color.kind == "categorical"
    shares = dict(zip(color.categories, color.shares[:-1], strict=True))
    for name, p in zip(COLORS, COLOR_P, strict=True):
        assert shares[name] == pytest.approx(p, abs=0.02)
    assert profile.predictions is not None and profile.predictions.categories == ["1", "0"]


def test_profile_command_reads_csv_with_a_header_and_bins_option(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    lines = ["a,kind"] + [f"{i},{'x' if i % 4 else 'y'}" for i in range(1000)] + [",x", "oops,y"]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "baseline.json"
    assert main(["profile", str(data), "-o", str(out), "--bins", "4"]) == 0
    doc = orjson.loads(out.read_bytes())
    a = doc["features"]["a"]
    assert a["kind"] == "numeric" and (a["missing"], a["invalid"]) == (1, 1)
    np.testing.assert_allclose(a["edges"], np.quantile(np.arange(1000.0), [0.25, 0.5, 0.75]))
    kind = doc["features"]["kind"]
    assert kind["categories"] == ["x", "y"] and kind["other"] == 0.0


def test_profile_command_exits_2_without_instances(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text('{"nothing": 1}\n')
    assert main(["profile", str(data), "-o", str(tmp_path / "x.json")]) == 2
    assert "no instances" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.json")]) == 2


def test_drift_config_defaults() -> None:
    config = DriftConfig()
    assert dataclasses.astuple(config) == ("", 5000, 1.0, 10000, (), 100)


async def test_close_returns_even_when_it_meets_a_wake_up(tmp_path: Path) -> None:
    # The background task waits for a wake-up or its interval; a close() that arrives as a full
    # batch wakes it must still end it (asyncio.wait_for on 3.11 could swallow that cancellation).
    payload = orjson.dumps({"instances": BASE_ROWS[:1]})
    for _ in range(20):
        m = monitor(tmp_path, BASE_ROWS)
        await m.start()
        await asyncio.sleep(0)
        for _ in range(drift_module.PROCESS_BATCH):  # the 256th record wakes the task
            m.on_exchange(record(payload), wanted=True)
        started = time.perf_counter()
        await asyncio.wait_for(m.close(), 2)
        # At once: not after the task has processed the batch and waited out part of its interval.
        assert time.perf_counter() - started < drift_module.PROCESS_INTERVAL_S / 2
        assert m._task is None
