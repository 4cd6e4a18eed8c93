"""The OpenVINO export, run as ``python -m hubquant.exporters.openvino_worker PLAN RESULT``.

PLAN (JSON, written by :class:`hubquant.exporters.openvino.OpenVINOExporter`) names the source and
the variants; RESULT receives, per variant folder name, the seconds it took, warnings, and an
error (message + hint) when it failed. Progress lines go to stdout with a prefix the parent reads.
One failing variant never stops the others.

Data-free int4/int8 variants are only prepared here (marked ``deferred``): the parent then runs
:mod:`hubquant.exporters.openvino_compress`, which compresses them without torch in memory.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hubquant.child import hand_back, release_memory, say
from hubquant.errors import ExportError, HubquantError
from hubquant.exporters.openvino import COMPRESS_SPEC, INT4_OPTIONS, import_optimum_intel
from hubquant.faults import checkpoint

TASK = "text-generation-with-past"
#: Files of the exported IR that a compressed variant replaces with its own.
MODEL_FILES = {"openvino_model.xml", "openvino_model.bin", "openvino_config.json", "config.json"}
TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")


def export_ir(source: str, folder: Path, ov_config: Any) -> None:
    """optimum-intel's export of the source with converted tokenizers, as its CLI does it."""
    from optimum.exporters.openvino import main_export

    main_export(source, folder, task=TASK, ov_config=ov_config, convert_tokenizer=True)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(
            f"openvino-tokenizers could not convert this tokenizer (no {', '.join(missing)})",
            format="openvino",
            hint="openvino-genai needs them; run with HUBQUANT_DEBUG=1 to see why the conversion failed",
        )


def calibration_samples(source: str, options: dict[str, Any]) -> list[str] | str:
    """The dataset NNCF calibrates on: samples cut from a text, or an optimum-intel dataset name."""
    from transformers import AutoTokenizer

    from hubquant.text import BUILTIN_CALIBRATION_TEXT, read_text

    dataset = options.get("dataset")
    if dataset and not Path(dataset).is_file() and dataset != "builtin":
        return dataset  # an optimum-intel dataset name (wikitext2, c4, auto …)
    text = read_text(None if dataset in (None, "builtin") else dataset, builtin=BUILTIN_CALIBRATION_TEXT)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = options["calibration_context"]
    windows = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)] or [ids]
    if options.get("num_samples"):
        windows = windows[: options["num_samples"]]
    return [tokenizer.decode(window) for window in windows]


def int4_config(source_id: str, options: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The int4 settings: optimum-intel's defaults when no compression option is set, else the options."""
    from optimum.intel.openvino.configuration import _DEFAULT_4BIT_WQ_CONFIG, get_default_quantization_config

    explicit = any(options.get(key) not in (None, False) for key in INT4_OPTIONS)
    if not explicit and options["defaults"] == "model":
        model_default = get_default_quantization_config(source_id, weight_format="int4")
        config = dict(model_default or _DEFAULT_4BIT_WQ_CONFIG)
        if model_default:
            warnings.append(
                f"optimum-intel's recommended int4 settings for {Path(source_id).name} applied: "
                + ", ".join(f"{k}={v}" for k, v in sorted(config.items(), key=lambda kv: kv[0]) if k != "dataset")
            )
        if "dataset" in config:
            named = config.pop("dataset")
            if not options.get("dataset"):
                warnings.append(
                    f"optimum-intel's settings calibrate on {named}; calibrated on hubquant's built-in "
                    f"text instead (set dataset={named} to follow them exactly)"
                )
            config["dataset"] = options.get("dataset") or "builtin"
        elif options.get("dataset"):
            config["dataset"] = options["dataset"]
        return config
    config: dict[str, Any] = {"bits": 4, "sym": bool(options.get("sym")), "ratio": options.get("ratio") or 1.0}
    config["group_size"] = (
        options["group_size"] if options.get("group_size") is not None else _DEFAULT_4BIT_WQ_CONFIG["group_size"]
    )
    if options.get("all_layers") is not None:
        config["all_layers"] = options["all_layers"]
    if options.get("awq"):
        config["quant_method"] = "awq"
    for key in ("scale_estimation", "gptq"):
        if options.get(key):
            config[key] = True
    if options.get("backup_precision"):
        config["backup_precision"] = options["backup_precision"]
    data_aware = options.get("awq") or options.get("scale_estimation") or options.get("gptq")
    if data_aware or options.get("dataset"):
        config["dataset"] = options.get("dataset") or "builtin"
    return config


def quantization_config(
    source: str, source_id: str, precision: str, options: dict[str, Any], warnings: list[str]
) -> tuple[Any, dict[str, Any]]:
    """NNCF's config for one variant, and the settings as recorded in the manifest."""
    from optimum.intel import OVWeightQuantizationConfig

    if precision == "int8":
        settings: dict[str, Any] = {"bits": 8, "sym": bool(options.get("sym")), "group_size": -1, "ratio": 1.0}
    else:
        settings = int4_config(source_id, options, warnings)
    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in settings.items()}
    record = dict(settings)
    if "dataset" in settings:
        named = settings["dataset"]
        settings["dataset"] = calibration_samples(source, {**options, "dataset": named})
        if options.get("num_samples"):
            settings["num_samples"] = options["num_samples"]
        elif isinstance(settings["dataset"], list):
            settings["num_samples"] = len(settings["dataset"])
        settings["tokenizer"] = source
        record["dataset"] = (
            "hubquant built-in calibration text"
            if named == "builtin"
            else Path(named).name
            if Path(named).is_file()
            else named
        )
        record["num_samples"] = settings.get("num_samples")
        if isinstance(settings["dataset"], list):
            from hubquant.text import BUILTIN_CALIBRATION_TEXT, read_text

            record["sample_tokens"] = options["calibration_context"]
            text = read_text(None if named == "builtin" else named, builtin=BUILTIN_CALIBRATION_TEXT)
            record["sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return OVWeightQuantizationConfig(**settings), record


def compress(ir: Path, folder: Path, config: Any, source_id: str) -> None:
    """One compressed variant from the shared IR: optimum-intel's own load-and-compress path."""
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(str(ir), compile=False, quantization_config=config, use_cache=True)
    model.save_pretrained(str(folder))
    del model
    finish_folder(ir, folder, source_id)


def finish_folder(ir: Path, folder: Path, source_id: str) -> None:
    """What a compressed variant takes from the IR, and a tokenizer path optimum-intel should not record."""
    saved = folder / "openvino_config.json"
    if saved.is_file():
        config_json = json.loads(saved.read_text())
        quant = config_json.get("quantization_config") or {}
        if quant.get("tokenizer"):  # a local path (the IR's): keep only a Hub id
            quant["tokenizer"] = source_id if not Path(source_id).exists() else None
        saved.write_text(json.dumps(config_json, indent=2) + "\n")
    for item in ir.iterdir():  # tokenizers, detokenizer, chat template, generation config
        if item.name not in MODEL_FILES and not (folder / item.name).exists():
            shutil.copy2(item, folder / item.name)


def prepare_torch_free(ir: Path, jobs: list[dict[str, Any]], configs: dict[str, Any], source_id: str) -> list[Any]:
    """Data-free variants for :mod:`hubquant.exporters.openvino_compress`: optimum-intel's own steps up to
    ``nncf.compress_weights`` (the configuration ``from_pretrained(ir, quantization_config=…)`` resolves,
    the JSON files ``save_pretrained`` writes), so only the compression itself runs without torch.

    Returns, per job, the compressor's entry or the exception that stopped its preparation.
    """
    from optimum.intel import OVConfig, OVModelForCausalLM
    from optimum.intel.openvino.modeling_base import _apply_default_ignored_scope_config
    from optimum.intel.openvino.quantization import OVQuantizer

    model = OVModelForCausalLM.from_pretrained(str(ir), compile=False, use_cache=True)  # weights stay mapped
    prepared: list[Any] = []
    for job in jobs:
        try:
            config = type(model)._resolve_default_quantization_config(str(ir), configs[job["name"]])
            config = model._preprocess_quantization_config(config, str(ir))
            pipeline = OVQuantizer(model)._construct_pipeline_quantization_config(config)
            pipeline = _apply_default_ignored_scope_config(str(ir), pipeline)
            own = pipeline.quantization_configs.get("model", pipeline.default_config)
            arguments = own.to_nncf_dict()
            arguments.pop("weight_only", None)
            folder = Path(job["folder"])
            folder.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(folder)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(folder)
            model._openvino_config = OVConfig(quantization_config=pipeline)
            model._save_openvino_config(folder)
            finish_folder(ir, folder, source_id)
            prepared.append({**job, "arguments": arguments, "dq_group_size": own.dq_group_size})
        except Exception as exc:  # noqa: BLE001 - reported per variant
            traceback.print_exc()
            prepared.append(exc)
    return prepared


def failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, HubquantError):
        return {"message": exc.message, "hint": exc.hint}
    if isinstance(exc, MemoryError):
        return {"message": "the OpenVINO export ran out of memory", "hint": "free memory or export fewer variants"}
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    message = f"optimum-intel/NNCF failed: {name}: {text[0] if text else ''}".rstrip(": ")
    if "nncf" in repr(type(exc)).lower() or "nncf" in "".join(traceback.format_tb(exc.__traceback__)).lower():
        message = f"NNCF weight compression failed: {name}: {text[0] if text else ''}"
    return {"message": message, "hint": "check the options (see 'hubquant formats'); HUBQUANT_DEBUG=1 shows the log"}


def _export_full_precision(source: str, jobs: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """fp16/fp32 variants: optimum-intel's export straight into each variant's folder."""
    from optimum.intel import OVConfig

    for job in jobs:
        say(f"openvino {job['precision']}: exporting with optimum-intel")
        started = time.perf_counter()
        try:
            export_ir(source, Path(job["folder"]), OVConfig(dtype=job["precision"]))
            results[job["name"]] = {"seconds": time.perf_counter() - started, "warnings": []}
        except Exception as exc:  # noqa: BLE001 - reported per variant
            traceback.print_exc()
            results[job["name"]] = {"error": failure(exc), "seconds": time.perf_counter() - started}


def _compress_all(plan: dict[str, Any], jobs: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """int4/int8 variants: the full-precision IR exported once, then NNCF compression per variant."""
    from optimum.intel import OVConfig

    source, source_id = plan["source"], plan["source_id"]
    configs: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    warnings: dict[str, list[str]] = {job["name"]: [] for job in jobs}
    for job in jobs:
        try:
            configs[job["name"]], records[job["name"]] = quantization_config(
                source, source_id, job["precision"], job["options"], warnings[job["name"]]
            )
        except Exception as exc:  # noqa: BLE001 - reported per variant
            traceback.print_exc()
            results[job["name"]] = {"error": failure(exc)}
    pending = [job for job in jobs if job["name"] in configs]
    if not pending:
        return
    ir = Path(plan["work_dir"]) / "openvino-ir"
    say("openvino: exporting the full-precision IR (once for every int4/int8 variant)")
    started = time.perf_counter()
    try:
        # The same call optimum-cli makes before compressing: a config with quantization settings
        # keeps the export itself uncompressed (no automatic int8 for models over 1B weights).
        export_ir(source, ir, OVConfig(quantization_config=configs[pending[0]["name"]]))
    except Exception as exc:  # noqa: BLE001 - every variant needs the IR
        traceback.print_exc()
        results.update({job["name"]: {"error": failure(exc)} for job in pending})
        return
    release_memory()  # what the torch export freed, before NNCF allocates the compressed weights
    shared = time.perf_counter() - started
    meta = {
        job["name"]: {"shared_seconds": shared, "warnings": warnings[job["name"]], "settings": records[job["name"]]}
        for job in pending
    }
    _compress_from_ir(plan, ir, pending, configs, meta, results)


def _compress_from_ir(
    plan: dict[str, Any],
    ir: Path,
    pending: list[dict[str, Any]],
    configs: dict[str, Any],
    meta: dict[str, dict[str, Any]],
    results: dict[str, Any],
) -> None:
    """Calibrated variants are compressed here (their data needs torch and transformers); data-free ones are
    prepared for the torch-free compressor the parent runs once this process has ended."""
    free = [job for job in pending if "dataset" not in meta[job["name"]]["settings"]]
    deferred = []
    started = time.perf_counter()
    try:
        prepared = prepare_torch_free(ir, free, configs, plan["source_id"]) if free else []
    except Exception as exc:  # noqa: BLE001 - the IR would not load: the data-free variants fail, not the rest
        traceback.print_exc()
        prepared = [exc] * len(free)
    for job, entry in zip(free, prepared, strict=True):
        if isinstance(entry, Exception):
            results[job["name"]] = {"error": failure(entry)}
        else:
            deferred.append(entry)
            results[job["name"]] = {**meta[job["name"]], "deferred": True}
    for entry in deferred:  # the preparation, shared by the deferred variants
        results[entry["name"]]["seconds"] = (time.perf_counter() - started) / len(deferred)
    for job in (job for job in pending if job not in free):
        say(f"openvino {job['precision']}: compressing with NNCF (calibrated)")
        started = time.perf_counter()
        try:
            compress(ir, Path(job["folder"]), configs[job["name"]], plan["source_id"])
            results[job["name"]] = {**meta[job["name"]], "seconds": time.perf_counter() - started}
        except Exception as exc:  # noqa: BLE001 - reported per variant
            traceback.print_exc()
            results[job["name"]] = {"error": failure(exc), "seconds": time.perf_counter() - started}
    if deferred:
        (Path(plan["work_dir"]) / COMPRESS_SPEC).write_bytes(pickle.dumps({"ir": str(ir), "jobs": deferred}))
    else:
        shutil.rmtree(ir, ignore_errors=True)  # the temporary IR goes as soon as no variant needs it


def run(plan: dict[str, Any]) -> dict[str, Any]:
    checkpoint("openvino-exporting")
    import_optimum_intel()
    results: dict[str, Any] = {}
    _export_full_precision(plan["source"], [j for j in plan["jobs"] if j["precision"] in ("fp16", "fp32")], results)
    compressed = [job for job in plan["jobs"] if job["precision"] in ("int4", "int8")]
    if compressed:
        _compress_all(plan, compressed, results)
    return results


def main(argv: list[str]) -> int:
    plan_path, result_path = Path(argv[0]), Path(argv[1])
    plan = json.loads(plan_path.read_text())
    try:
        results = run(plan)
    except Exception as exc:  # noqa: BLE001 - e.g. a broken installation: every variant fails alike
        traceback.print_exc()
        hint = getattr(exc, "hint", None)
        error = {"message": str(getattr(exc, "message", exc)), "hint": hint} if hint else failure(exc)
        results = {job["name"]: {"error": error} for job in plan["jobs"]}
    hand_back(result_path, json.dumps(results, indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
