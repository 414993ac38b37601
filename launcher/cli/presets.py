"""`launch presets` lists the presets; `launch presets show NAME` prints one."""

from __future__ import annotations

import typer

from launcher.cli.app import app

presets_app = typer.Typer(
    help="List the model presets (built-in and yours); `launch presets show NAME` prints one.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(presets_app, name="presets")


@presets_app.callback(invoke_without_command=True)
def presets(ctx: typer.Context) -> None:
    """List every preset: name, native context, default RoPE, default session (a published recipe's where
    the preset has one), engine, repo."""
    if ctx.invoked_subcommand is not None:
        return
    from launcher.model.presets import all_presets
    from launcher.rules.context import ask
    from launcher.rules.rope import decide, read_rope
    from launcher.runtime.paths import user_presets_dirs

    rows = all_presets()
    typer.echo(f"{'NAME':<26} {'NATIVE':>8} {'DEFAULT':<13} {'SERVES':>9}  {'ENGINE':<9} REPO")
    for entry, p in rows:
        default = f"{p.rope.type} x{p.rope.factor:g}"
        config = p.stub_config()  # the default session: the published recipe's, else what the scaling covers
        asked = ask(read_rope(config), context=None, factor=None, rope_type=None, session_len=None,
                    preset_type=p.rope.type, preset_factor=p.rope.factor, recipe=p.published, engine=p.engine.backend)
        serves = f"{decide(config, asked.rope).session_len:,}"
        origin = "" if entry.builtin else "  (user)"
        typer.echo(
            f"{p.name:<26} {p.native_context:>8,} {default:<13} {serves:>9}  {p.engine.backend:<9} {p.repo}{origin}"
        )
    dirs = ", ".join(str(d) for d in user_presets_dirs())
    typer.echo(err=True)
    typer.echo(f"note: your own presets go in {dirs} (LAUNCH_PRESETS_DIR).", err=True)


@presets_app.command("show")
def show(name: str = typer.Argument(..., help="Preset name.")) -> None:
    """Print one preset's file."""
    from launcher.model.presets import get_preset, preset_files

    get_preset(name)  # validates, and suggests names when unknown
    entry = preset_files()[name]
    typer.echo(f"# {entry.path}")
    typer.echo(entry.path.read_text(encoding="utf-8").rstrip())
