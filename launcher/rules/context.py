"""Ask for a context, not a factor: what the RoPE rules are asked for, from ``--context N`` or from
``--factor`` / ``--session-len`` and a preset's published recipe. Pure: no files, no I/O.

``--context N`` (tokens; ``64k`` = 65,536) is the session. What is written follows, in this order:

1. **Covered as shipped.** When the config's own scaling (or the native context, without one) already
   covers N, nothing of RoPE is written; only the session is set. A ``--type`` other than the shipped
   one is written only past the native context (below it no RoPE type changes anything).
2. **A published recipe past N x F.** When the preset's default recipe (``Recipe``: the makers' or
   lmdeploy's published session for a scaling) is past what its scaling covers (InternLM2.5-7B-Chat-1M at
   1,048,576 with dynamic x2.5, past 2.5 x 262,144), and N lies between the two, the recipe's scaling is
   written: the makers serve it so. Below N x F the factor is derived (a static type's smaller factor
   changes short texts less). A recipe that is no default (``default: false``) only vouches for a
   session: it silences the warning, it does not choose the factor.
3. **Derived.** Otherwise the factor is N / native, exact (not rounded up to a whole number), with the
   type asked for (``--type``), else the preset's (the one its makers recommend: Qwen2.5 yarn, InternLM
   dynamic, Llama 3.1 llama3), else the config's, else dynamic.

Without ``--context``, a preset's default recipe gives the default session when the scaling asked for is
the recipe's; its engine values (tp, ...) are defaults wherever the session is past N x F (a shorter one
needs no 1M layout). A dynamic session past N x F is warned about (``rope.py``) only when
no published recipe covers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import LaunchError
from launcher.rules import limits
from launcher.rules.rope import RopeRequest, RopeState


@dataclass(frozen=True)
class Recipe:
    """A published serving setting for a model: a session its makers (or lmdeploy) serve with one
    scaling, the engine values they serve it with, and where it is published."""

    source: str
    session_len: int
    rope_type: str
    factor: float
    engine: dict = field(default_factory=dict)  # EngineSettings field -> value (tp, max_batch_size, ...)
    default: bool = True  # its session (and engine values) are the preset's defaults; else it only covers

    def covers(self, rope_type: str | None, factor: float | None) -> bool:
        """The scaling asked for (None: the preset's, which is the recipe's) is this recipe's."""
        return rope_type in (None, self.rope_type) and (factor is None or factor == self.factor)


class ContextPastFactor(LaunchError):
    """N / native past the largest factor launch writes."""

    context: int
    native: int
    factor: float
    exit_code = 2

    def message(self) -> str:
        return (f"--context {self.context:,} is x{self.factor:g} of the native {self.native:,} tokens, past the "
                f"largest factor launch writes (x{limits.FACTOR.high:g}): ask for a shorter --context")


@dataclass(frozen=True)
class Asked:
    """What the RoPE rules are asked for, and why: ``how`` says how the factor was derived from
    ``--context`` (None without it); ``recipe`` is the published recipe whose values are defaults."""

    rope: RopeRequest
    how: str | None = None
    recipe: Recipe | None = None


def ask(before: RopeState, *, context: int | None, factor: float | None, rope_type: str | None,
        session_len: int | None, preset_type: str | None, preset_factor: float | None,
        recipe: Recipe | None, force: bool = False, engine: str = "turbomind") -> Asked:
    """The RoPE request for the user's flags (``factor``, ``rope_type``, ``session_len`` or
    ``context``: typed and checked where they entered, ``--context`` never with the other two) over the
    preset's scaling and recipe, on a config whose RoPE is ``before``."""
    if context is None:
        f = factor if factor is not None else preset_factor
        t = rope_type if rope_type is not None else preset_type
        covering = recipe if recipe is not None and recipe.covers(t, f) else None
        # a default recipe gives the session, and its engine values go with a session past N x F
        used = covering if covering is not None and covering.default and (
            session_len is None or session_len > before.native_context * covering.factor) else None
        if session_len is None and used is not None:
            session_len = used.session_len
        return Asked(RopeRequest(factor=f, rope_type=t, session_len=session_len, force=force, engine=engine,
                                 published_session=covering.session_len if covering else None), recipe=used)
    native, shipped = before.native_context, before.rope_type
    if context <= before.served_context and (rope_type in (None, shipped) or context <= native):
        kept = f"{shipped} x{before.factor:g}" if shipped and before.factor else shipped
        how = (f"{context:,} tokens are within the native {native:,}: no scaling is written" if context <= native
               else f"the config's own {kept} covers {before.served_context:,} tokens: the config is left as it is")
        if rope_type not in (None, shipped) and context <= native:
            how += f" (--type {rope_type} changes nothing there)"
        return Asked(RopeRequest(session_len=context, force=force, engine=engine, keep=True), how)
    if recipe is not None and recipe.default and rope_type in (None, recipe.rope_type) and (
            native * recipe.factor < context <= recipe.session_len):
        how = (f"{recipe.rope_type} x{recipe.factor:g}, the published recipe's, which serves sessions up to "
               f"{recipe.session_len:,} tokens ({recipe.source})")
        return Asked(RopeRequest(factor=recipe.factor, rope_type=recipe.rope_type, session_len=context, force=force,
                                 engine=engine, published_session=recipe.session_len), how, recipe)
    chosen, why = next((t, why) for t, why in ((rope_type, "--type"), (preset_type, "the preset's type"),
                                                (shipped, "the config's type"), ("dynamic", "launch's default"))
                       if t is not None)
    derived = context / native
    if not limits.FACTOR.contains(derived):
        raise ContextPastFactor(context, native, derived)
    how = f"{context:,} / {native:,} native tokens = x{derived:g}, {chosen} ({why})"
    return Asked(RopeRequest(factor=derived, rope_type=chosen, session_len=context, force=force, engine=engine), how)
