"""``hubquant quantize``, ``formats`` and ``tiny``: what to build, and building it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hubquant.commands.common import Progress, parse_options, print_tracking, tracking, tracking_options
from hubquant.display import human_size
from hubquant.errors import RecipeError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the formats as JSON.")
def formats(as_json: bool) -> None:
    """List every format with its precisions, options and defaults."""
    from hubquant.exporters import registered_exporters

    described = [cls.describe() for cls in registered_exporters().values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for entry in described:
        click.echo(f'{entry["format"]}: {entry["description"]}  (pip install "hubquant[{entry["extra"]}]")')
        generic = ", ".join(f"{k}→{v}" for k, v in entry["generic_precisions"].items())
        click.echo(f"  generic precisions: {generic}")
        click.echo("  precisions:")
        for name, text in entry["precisions"].items():
            click.echo(f"    {name:<9} {text}")
        if entry.get("targets"):
            click.echo("  targets (--option target=…):")
            for target, allowed in entry["targets"].items():
                click.echo(f"    {target:<9} {', '.join(allowed)}")
        click.echo("  options (--option KEY=VALUE):")
        for option in entry["options"]:
            click.echo(f"    {option['name']:<19} default {option['default']!r:<6} {option['help']}")


def print_results(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([a.summary() for a in result.artifacts], indent=2))
    else:
        for variant in result.variants:
            artifact = variant.artifact
            if artifact is None:
                continue
            note = " (reused)" if artifact.reused else ""
            click.echo(
                f"{artifact.format:<5} {artifact.precision:<8} {human_size(artifact.size_bytes):>9}  "
                f"{artifact.path}{note}"
            )
    for variant in result.variants:
        for warning in variant.artifact.warnings if variant.artifact else []:
            click.echo(f"hubquant: warning: {warning}", err=True)
    for failure in result.failures:
        error = failure.error
        hint = f" — {error.hint}" if error.hint else ""
        click.echo(f"hubquant: error: {failure.spec.label}: {error.message}{hint}", err=True)


@click.command()
@click.argument("source", required=False)
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), help="Build the variants of a YAML recipe.")
@click.option("--format", "fmt", default="gguf", show_default=True, help="Output format (see 'hubquant formats').")
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    help="int4/int8/fp16/fp32 or a native name (Q4_K_M, IQ4_XS …); repeat for several.",
)
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="A format option; repeatable.")
@click.option("--revision", help="Hub branch, tag or commit of SOURCE.")
@click.option(
    "--output",
    type=click.Path(file_okay=True),
    default="hubquant-out",
    show_default=True,
    help="Folder that receives one sub-folder per variant.",
)
@click.option(
    "--scratch",
    type=click.Path(file_okay=False),
    help="Folder for intermediates (GGUF F16, OpenVINO IR, ONNX prequantized weights); default: inside --output.",
)
@click.option("--force", is_flag=True, help="Rebuild variants even when their inputs are unchanged.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the artifacts as JSON (path, format, precision, size, sha256)."
)
@tracking_options
def quantize(
    source: str | None,
    recipe_file: str | None,
    fmt: str,
    precisions: tuple[str, ...],
    options: tuple[str, ...],
    revision: str | None,
    output: str,
    scratch: str | None,
    force: bool,
    as_json: bool,
    no_track: bool,
    experiment: str | None,
    new_run: bool,
) -> None:
    """Quantize SOURCE (a local folder or a Hub id) into one or more variants.

    \b
    Examples:
      hubquant quantize ./Phi-3.5-mini-instruct --precision Q4_K_M --precision Q8_0
      hubquant quantize ./phi-4 --precision IQ4_XS --option imatrix=true
      hubquant quantize --recipe phi35.yaml
    """
    from hubquant.pipeline import quantize as run_quantize
    from hubquant.recipe import build_recipe, load_recipe

    if recipe_file:
        if source or precisions or options:
            raise RecipeError(
                "--recipe cannot be combined with SOURCE, --precision or --option",
                hint="put everything in the recipe, or use the flags without --recipe",
            )
        recipe = load_recipe(recipe_file)
    else:
        if not source:
            raise RecipeError("no SOURCE given", hint="pass a model folder or Hub id, or --recipe FILE")
        data = {
            "source": source,
            "revision": revision,
            "output": output,
            "variants": [
                {"format": fmt, "precision": p, "options": parse_options(options)} for p in (precisions or ("int4",))
            ],
        }
        recipe = build_recipe(data, origin="command line")
    if scratch:
        recipe = recipe.model_copy(update={"scratch": Path(scratch)})
    result = run_quantize(recipe, force=force, progress=Progress(), tracking=tracking(no_track, experiment, new_run))
    print_results(result, as_json)
    print_tracking(result.tracking)
    if result.failures:
        raise SystemExit(1)


@click.command()
@click.argument("what", type=click.Choice(["openvino-vision", "mlx-vision"]))
def setup(what: str) -> None:
    """Create an environment a route needs ahead of time (hubquant otherwise creates it on first need).

    openvino-vision: transformers 4.53.3 beside hubquant's packages, for Phi-4-multimodal's OpenVINO export.
    mlx-vision: transformers 5.14.1 and mlx-vlm 0.7.10, for Phi-4 with SigLIP2 as MLX.
    """
    from hubquant.vision_env import ENVIRONMENTS, ensure_env, env_size

    env = ENVIRONMENTS[what]
    python = ensure_env(lambda line: click.echo(line, err=True), env)
    click.echo(f"{python.parent.parent} ({', '.join(env.pins)}; {env_size(python.parent.parent) / 1e6:.0f} MB)")


@click.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option(
    "--style",
    type=click.Choice(["phi3", "phi4"]),
    default="phi3",
    show_default=True,
    help="phi3: SentencePiece tokenizer; phi4: byte-level BPE.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for the tokenizer, weights and training batches.")
@click.option("--steps", default=300, show_default=True, help="Training steps (0 keeps random weights).")
@click.option(
    "--vision",
    is_flag=True,
    help="A Phi-4-with-SigLIP2-shaped vision model (Phi4ForCausalLMV): the tiny Phi-3 plus a random vision "
    "tower and projector, which GGUF builds with its mmproj and MLX through mlx-vlm.",
)
@click.option(
    "--multimodal",
    is_flag=True,
    help="A native Phi-4-multimodal (Phi4MultimodalForCausalLM): the tiny Phi-3 plus random SigLIP and audio "
    "encoders, which OpenVINO builds (written in the OpenVINO vision environment, created on first need).",
)
def tiny(output: str, style: str, seed: int, steps: int, vision: bool, multimodal: bool) -> None:
    """Build a tiny trained Phi checkpoint in OUTPUT (for trying hubquant without a download)."""
    from hubquant.errors import OutputError, RecipeError
    from hubquant.tiny import build_tiny_phi, tiny_phi
    from hubquant.tiny_multimodal import add_multimodal
    from hubquant.tiny_vision import add_vision_tower

    if Path(output).exists():
        raise OutputError(
            f"{output} already exists", path=output, hint="choose a new folder; hubquant never overwrites it"
        )
    if vision and multimodal:
        raise RecipeError("--vision and --multimodal are two models", key="vision", hint="pass one of them")
    if (vision or multimodal) and style != "phi3":
        raise RecipeError(
            f"{'--vision' if vision else '--multimodal'} builds on the phi3 style (the tiny Phi-3's SentencePiece "
            "vocabulary)",
            key="style",
            hint="drop --style, or pass --style phi3",
        )
    if multimodal:
        click.echo(str(add_multimodal(tiny_phi("phi3", seed=seed, steps=steps), Path(output), seed=seed)))
        return
    if vision:  # the text model is built (or reused) in the cache, then given its vision tower here
        click.echo(str(add_vision_tower(tiny_phi("phi3", seed=seed, steps=steps), output, seed=seed)))
        return
    click.echo(str(build_tiny_phi(output, style=style, seed=seed, steps=steps)))  # type: ignore[arg-type]


@click.command()
@click.option(
    "--output",
    type=click.Path(file_okay=True),
    default="hubquant-demo",
    show_default=True,
    help="Folder for the demo's variants.",
)
def demo(output: str) -> None:
    """Run the main job on the embedded default: a tiny Phi-3 model through 'publish', four formats, Hub dry run.

    The tiny model is built once (about a minute) and cached; re-running reuses everything.
    """
    from hubquant.demo import run_demo

    progress = Progress()
    table = run_demo(Path(output), progress=progress)
    click.echo(table)
