"""Form fields generated from a transform's parameter declarations
(:class:`modelkit.core.registry.Param`): a choice is a select, a bool a
switch, anything else (numbers, block-wise values, lists) a text field.
Nothing here is written per method: a new transform gets its fields from
its signature."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.suggester import SuggestFromList
from textual.widget import Widget
from textual.widgets import Input, Label, Select, Switch

from modelkit.core.registry import Param, Transform, parse_text
from modelkit.tui.recipes import LORA_BLOCK_PARAMS, BlockHints, block_hints, field_text


def field_row(label: str, field: Widget, tooltip: str | None = None,
              id: str | None = None, after: Widget | None = None) -> Horizontal:
    """One line of a form: a label, its field and what goes ``after`` it."""
    row = Horizontal(Label(label, classes="field-label"), field,
                     *([after] if after else []), classes="field-row", id=id)
    if tooltip:
        row.tooltip = tooltip
    return row


def _placeholder(p: Param, t: Transform, n_models: int, hints: BlockHints) -> str:
    if p.blockwise:
        return hints.example
    if p.name in LORA_BLOCK_PARAMS:
        return hints.lora_example + "; empty: none"
    if p.per_model:
        n_var, var = n_models - len(t.inputs) + 1, t.inputs[-1][0]
        text = f"a number, or {n_var} comma-separated (one per {var})" if n_var > 1 \
            else "a number"
        return text + ("; empty: default" if p.default is None else "")
    if p.kind == "list":
        return f"comma list of {','.join(p.choices)}" + ("" if p.required else
                                                         "; empty: default")
    return "required" if p.required else "empty: default"


def param_field(p: Param, t: Transform, n_models: int, hints: BlockHints) -> Widget:
    """The field for ``p`` (id ``param-NAME``); a block-wise field completes
    the presets, groups and block names of the selected models' family."""
    wid = f"param-{p.name}"
    if p.kind == "choice":
        value = p.choices[0] if p.required or p.default not in p.choices else p.default
        return Select([(c, c) for c in p.choices], value=value, allow_blank=False,
                      compact=True, id=wid)
    if p.kind == "bool":
        return Switch(bool(p.default) if not p.required else False, id=wid)
    words = hints.merge if p.blockwise else hints.lora if p.name in LORA_BLOCK_PARAMS \
        else None
    suggester = SuggestFromList(words) if words else None
    return Input(field_text(p), placeholder=_placeholder(p, t, n_models, hints),
                 compact=True, suggester=suggester, id=wid)


def _on_off(value: bool) -> str:
    return "on" if value else "off"


class ParamForm(Vertical):
    """The parameter fields of one transform; :meth:`show` swaps them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.transform: Transform | None = None
        self.n_inputs = 0
        self.hints = block_hints(None)

    async def show(self, transform: Transform | None, n_inputs: int,
                   hints: BlockHints | None = None) -> None:
        """Fields for ``transform`` taking ``n_inputs`` models (block-wise
        fields offer ``hints``: the selected family's presets and block
        names); the same transform keeps its fields and what was typed in
        them."""
        hints = hints or block_hints(None)
        if transform is self.transform and n_inputs == self.n_inputs and hints == self.hints:
            return
        self.transform, self.n_inputs, self.hints = transform, n_inputs, hints
        await self.recompose()

    def compose(self) -> ComposeResult:
        if self.transform is None:
            return
        for p in self.transform.params.values():
            # a switch's state in words too, not by colour only
            state = Label(_on_off(bool(p.default)), classes="switch-state") \
                if p.kind == "bool" else None
            yield field_row(p.name, param_field(p, self.transform, self.n_inputs,
                                                self.hints),
                            "\n".join(x for x in (p.describe(), p.help) if x), after=state)

    def on_switch_changed(self, event: Switch.Changed) -> None:
        row = event.switch.parent
        if row is not None:
            for label in row.query(".switch-state").results(Label):
                label.update(_on_off(event.value))

    @property
    def names(self) -> list[str]:
        """The parameters with a field now."""
        return [str(w.id).removeprefix("param-") for w in self.query(".field-row > *")
                if str(w.id or "").startswith("param-")]

    def values(self) -> dict[str, Any]:
        """Each field's value (None: empty, the default applies)."""
        if self.transform is None:
            return {}
        out: dict[str, Any] = {}
        for p in self.transform.params.values():
            matches = self.query(f"#param-{p.name}")
            if not matches:  # fields not mounted yet
                continue
            w = matches.first()
            if isinstance(w, Select):
                out[p.name] = None if w.is_blank() else w.value
            elif isinstance(w, Switch):
                out[p.name] = w.value
            elif isinstance(w, Input):
                out[p.name] = parse_text(p, w.value)
        return out
