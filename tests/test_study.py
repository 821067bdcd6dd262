"""The ablation study pipeline at a tiny budget on real data: records -> aggregation -> report, the
GPU driver's packing and deadline, and the two-level paired bootstrap against hand-computed cases."""

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.models import build
from harness.models.registry import CONF_DIR
from harness.report.study import paired_bootstrap_seeds, write_study_report
from harness.study import resolve_variant, run_study_job, study_identity
from harness.study_gpu import compose, sweep_variants
from harness.study_gpu import main as driver_main
from harness.validate import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "ablation_gray25"


def tiny(root, store) -> list[str]:
    """The study at a CPU-test budget: 4 steps of 2 patches of 32², width 8."""
    return [f"sets.root={root}", f"store_dir={store}", f"runs_dir={Path(store) / 'runs'}", "progress=false",
            "hardware=cpu", "train.iters=4", "train.batch_size=2", "train.patch_size=32",
            "train.warmup_iters=0", "train.val_every=2", "train.ckpt_every=0", "study.base.args.dim=8",
            "profile.flops_input=[1,1,32,32]", "erf.images=2", "erf.size=32"]


# --- paired bootstrap over images and seeds ------------------------------------------------------

def test_bootstrap_two_images_one_seed_is_the_exact_resampling_distribution():
    # Differences (0, 1): a resample of two images has mean 0, 0.5 or 1 with probability 1/4, 1/2,
    # 1/4, so the 2.5 % and 97.5 % quantiles are exactly 0 and 1.
    r = paired_bootstrap_seeds({0: [30.0, 31.0]}, {0: [30.0, 30.0]}, n_boot=20000)
    assert r["mean_diff"] == 0.5 and r["ci_low"] == 0.0 and r["ci_high"] == 1.0
    assert (r["seeds"], r["images"], r["resolved"]) == (1, 2, False)


def test_bootstrap_resamples_seeds_too():
    # One image, seed differences 1 and 3: seed resamples give 1, 2, 3 (1/4, 1/2, 1/4).
    r = paired_bootstrap_seeds({0: [2.0], 1: [5.0]}, {0: [1.0], 1: [2.0]}, n_boot=20000)
    assert r["mean_diff"] == 2.0 and r["ci_low"] == 1.0 and r["ci_high"] == 3.0 and r["resolved"]


def test_bootstrap_pairs_only_common_seeds_and_constant_gap_is_resolved():
    a = {0: [1.0, 2.0, 3.0], 1: [2.0, 3.0, 4.0], 7: [9.0, 9.0, 9.0]}
    b = {0: [0.9, 1.9, 2.9], 1: [1.9, 2.9, 3.9]}
    r = paired_bootstrap_seeds(a, b)
    assert r["seeds"] == 2 and math.isclose(r["ci_low"], 0.1) and math.isclose(r["ci_high"], 0.1) and r["resolved"]
    with pytest.raises(ValueError, match="no common seed"):
        paired_bootstrap_seeds({0: [1.0]}, {1: [1.0]})
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_bootstrap_seeds({0: [1.0, 2.0]}, {0: [1.0]})


def test_bootstrap_interval_matches_normal_theory_for_many_images():
    rng = np.random.default_rng(1)
    d = rng.normal(0.2, 1.0, size=400)
    r = paired_bootstrap_seeds({0: list(d)}, {0: [0.0] * 400}, n_boot=4000)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert abs((r["ci_high"] - r["ci_low"]) / 2 - half) < 0.1 * half


# --- variants ------------------------------------------------------------------------------------

def test_every_variant_resolves_builds_and_changes_one_factor():
    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{EXPERIMENT}.yaml").read_text())
    study = spec["study"]
    assert set(sweep_variants(EXPERIMENT)) == set(study["variants"])
    base = resolve_variant(study, study["reference"])
    for name, entry in study["variants"].items():
        cfg = resolve_variant(study, name)
        if "preset" in entry:
            assert cfg["meta"]["family"] != "eamamba"
        else:
            changed = {k for k in cfg if k != "meta" and cfg[k] != base[k]}
            assert changed == {k for k, v in entry["args"].items() if base[k] != v}, name
        model = build(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        resolve_variant(study, "nope")
    with pytest.raises(ConfigError, match="has no argument 'width'"):
        resolve_variant({**study, "variants": {"bad": {"args": {"width": 3}}}}, "bad")


def test_hash_follows_the_resolved_model(tmp_path):
    def run_hash(*extra):
        return study_identity(compose(EXPERIMENT, tiny("/data", tmp_path) + list(extra)), EXPERIMENT)[0]

    # Changing the shared base re-runs every EAMamba variant, and no baseline.
    assert run_hash("variant=cross") != run_hash("variant=cross", "study.base.args.d_state=8")
    assert run_hash("variant=dncnn") == run_hash("variant=dncnn", "study.base.args.d_state=8")
    assert run_hash("variant=cross") != run_hash("variant=all_around")
    assert run_hash("variant=cross", "seed=0") != run_hash("variant=cross", "seed=1")


# --- the pipeline on real data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sets_root(tmp_path_factory, eabench_data):
    """Real images, few and small: 8 Train400 images, the first two BSD68/Set12 images cropped to 64²
    (top-left, pixels unchanged), so a CPU run evaluates in seconds."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sets")
    for name, count, crop in (("Train400", 8, None), ("BSD68", 2, 64), ("Set12", 2, 64)):
        (root / name).mkdir()
        for path in sorted((eabench_data / name).glob("*.png"))[:count]:
            img = Image.open(path)
            (img.crop((0, 0, crop, crop)) if crop else img).save(root / name / path.name)
    return root


@pytest.fixture(scope="module")
def study_store(tmp_path_factory, sets_root):
    store = tmp_path_factory.mktemp("study")
    records = []
    for variant in ("all_around", "cross"):
        cfg = compose(EXPERIMENT, tiny(sets_root, store) + [f"variant={variant}", "seed=0"])
        records.append(run_study_job(cfg, experiment=EXPERIMENT))
    return store, records


def test_runs_store_per_image_tests_history_weights_and_erf(study_store):
    store, records = study_store
    for rec in records:
        assert rec["status"] == "ok", rec.get("traceback")
        assert set(rec["tests"]) == {"BSD68", "Set12"}
        for name, t in rec["tests"].items():
            assert t["images"] == 2 and len(t["metrics"]["psnr"]["values"]) == 2
            assert t["metrics"]["psnr"]["names"] == {"BSD68": ["test001", "test002"], "Set12": ["01", "02"]}[name]
            assert t["metrics"]["psnr"]["mean"] > t["input_metrics"]["psnr"] - 3  # trained a little, real data
        assert [h["iter"] for h in rec["train"]["history"] if "val_psnr" in h] == [2, 4]
        assert rec["train"]["ms_per_step"] > 0 and rec["profile"]["gmacs"] > 0
        assert (store / rec["weights"]).is_file() and (store / rec["erf"]["file"]).is_file()
        assert set(rec["erf"]["area_ratios"]) == {"0.2", "0.3", "0.5", "0.99"}
        stored = json.loads((store / "records" / f"{rec['config_hash']}.json").read_text())
        assert stored["variant"] == rec["variant"] and stored["config"]["model"]["directions"] == rec["variant"]
    cfg = compose(EXPERIMENT, tiny(Path(records[0]["config"]["data"]["train"]["folder"]).parent, store)
                  + ["variant=all_around", "seed=0"])
    assert run_study_job(cfg, experiment=EXPERIMENT).get("skipped") is True


def test_report_aggregates_records_into_tables_figures_and_claims(study_store, tmp_path):
    store, records = study_store
    out = write_study_report(store, EXPERIMENT, tmp_path / "report")
    df = __import__("pandas").read_csv(out / "results.csv")
    assert list(df["variant"]) == ["cross", "all_around"] or set(df["variant"]) == {"cross", "all_around"}
    by = {r["variant"]: r for r in records}
    row = df.set_index("variant").loc["cross"]
    diffs = np.subtract(by["cross"]["tests"]["BSD68"]["metrics"]["psnr"]["values"],
                        by["all_around"]["tests"]["BSD68"]["metrics"]["psnr"]["values"])
    assert math.isclose(row["BSD68_dpsnr"], diffs.mean(), abs_tol=1e-9)
    # Two images, one seed: the bootstrap means are d1, (d1 + d2) / 2, d2, so the interval is [min, max].
    assert (row["BSD68_dpsnr_lo"], row["BSD68_dpsnr_hi"]) == pytest.approx((diffs.min(), diffs.max()))
    assert row["seeds"] == 1 and row["params"] == by["cross"]["profile"]["params"]
    for name in ("table.md", "table.tex", "report.md", "runs.csv", "figures/psnr_vs_gmacs.png",
                 "figures/psnr_vs_train_time.png", "figures/learning_curves.png", "figures/erf_trained.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "All-around > cross" in report and "Train400" in report and "reference" in (out / "table.md").read_text()


def test_gpu_driver_packs_records_and_respects_the_deadline(study_store, tmp_path, sets_root):
    store, records = study_store
    args = ["--root", str(sets_root), "--out", str(tmp_path / "out"), "--store", str(store), "--hardware", "cpu",
            "--variants", "all_around,cross", "--seeds", "0", "--jobs", "1",
            *tiny(sets_root, store)[1:]]
    state = driver_main(args)
    assert {k: v["status"] for k, v in state["runs"].items()} == {"all_around,seed=0": "ok", "cross,seed=0": "ok"}
    assert all(v["skipped"] for v in state["runs"].values())
    with tarfile.open(tmp_path / "out" / "records.tar") as tar:
        names = set(tar.getnames())
    assert {f"records/{r['config_hash']}.json" for r in records} <= names
    assert {r["erf"]["file"] for r in records} <= names
    late = driver_main([*args[:3], str(tmp_path / "late"), *args[4:], "--deadline", "0", "--seeds", "1"])
    assert late["not_launched"] == ["all_around,seed=1", "cross,seed=1"] and not late["runs"]
    assert json.loads((tmp_path / "late" / "driver.json").read_text())["not_launched"] == late["not_launched"]


def test_run_py_sweeps_only_the_chosen_variants(study_store, sets_root):
    store, _ = study_store
    before = len(list((store / "records").glob("*.json")))
    cmd = [sys.executable, "run.py", "-m", f"experiment={EXPERIMENT}", "variant=raster", "seed=0", "report=false",
           *tiny(sets_root, store)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    new = [json.loads(p.read_text()) for p in (store / "records").glob("*.json")]
    assert len(new) == before + 1 and {r["variant"] for r in new} == {"all_around", "cross", "raster"}
