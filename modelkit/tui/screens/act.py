"""Act on the chosen files: a form for a merge, LoRA bake, prune, quantize,
extract (or any other registered operation the files fit), its dry-run
plan, and the run itself in a thread worker with progress and cancel. The
new file goes to the library screen, which indexes and selects it.

The same form starts a sweep (ctrl+s): the form's recipe over the axes
typed in its sweep field (``alpha = 0.3, 0.5``), or a sweep file, run into
the sweep folder on the :class:`~modelkit.tui.screens.sweep.SweepScreen`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message_pump import MessagePump
from textual.screen import Screen
from textual.widgets import Footer, Input, Select, Static, Switch

from modelkit.core.registry import Transform
from modelkit.errors import ModelkitError
from modelkit.library.query import Entry
from modelkit.textsafe import safe_text
from modelkit.tui import jobs, recipes
from modelkit.tui.messages import (
    JobFailed,
    JobFinished,
    JobProgress,
    LibraryChanged,
    TransformsLoaded,
)
from modelkit.tui.recipes import MERGE, ActSpec
from modelkit.tui.screens.error import ErrorDialog
from modelkit.tui.screens.sweep import SweepScreen
from modelkit.tui.sweeps import (
    JOB_CHOICES,
    axes_placeholder,
    default_sweep_dir,
    sweep_dir,
    sweep_spec,
)
from modelkit.tui.widgets.job_bar import JobBar
from modelkit.tui.widgets.param_form import ParamForm, field_row
from modelkit.vocab import MERGE_OUTPUT_DTYPES
from modelkit.wording import human_bytes

PLAN, RUN = "plan", "act"  # job names
LOADING = [("loading...", "")]  # choices until the registry is loaded
NARROW_COLUMNS = 120  # below this width the plan goes under the form


class ActScreen(Screen[None]):
    """The form, the plan and the run for ``entries`` (marked order)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+p", f"start('{PLAN}')", "Preview", priority=True, id="act-preview",
                tooltip="Plan it (dry run): size, counts, memory, block weights"),
        Binding("ctrl+r", f"start('{RUN}')", "Run", priority=True, id="act-run",
                tooltip="Write the new file in the background"),
        Binding("ctrl+s", "sweep", "Sweep", priority=True, id="act-sweep",
                tooltip="Run the form over the sweep axes (or a sweep file) into the sweep "
                        "folder, and show the table"),
        Binding("escape", "cancel", "Cancel", id="act-cancel",
                tooltip="Stop the run; no file is left behind"),
        Binding("x", "cancel", "Cancel", show=False, id="act-cancel-x"),
        Binding("escape", "back", "Back", id="act-back"),
        Binding("f1", "app.help", "Help", id="act-help"),
    ]

    def __init__(self, entries: list[Entry], library: MessagePump | None = None) -> None:
        super().__init__()
        self.entries = list(entries)
        self.library = library  # receives LibraryChanged with the new file
        self.transforms: dict[str, Transform] = {}
        self.cancel_event = threading.Event()
        self.job: str | None = None
        self.auto_output = ""  # the output field's text while the user has not edited it
        self.auto_sweep_dir = ""  # the same for the sweep folder field
        self.previewed: ActSpec | None = None  # what the plan shown was made from
        self.job_spec: ActSpec | None = None
        self.job_output = Path()
        self.output_existed = False
        self.report: Any = None  # the last run's report
        self.first_plan = True  # plan once as soon as the form is ready

    def compose(self) -> ComposeResult:
        # the layout class from the start: set after mount it restyles every widget
        self.set_class(self.app.size.width < NARROW_COLUMNS, "narrow")
        names = ", ".join(f"{e.name} ({e.kind} {e.arch})" for e in self.entries)
        yield Static(Text(safe_text(f"Act on {len(self.entries)}: {names}")), id="act-title")
        with Horizontal(id="act-main"):
            # disabled until the registry is loaded (set here: a change after
            # mount restyles the whole form)
            with VerticalScroll(id="act-form", disabled=True):
                yield field_row("action", Select(LOADING, allow_blank=False, compact=True,
                                                 id="act-action"))
                yield field_row("method", Select(LOADING, allow_blank=False, compact=True,
                                                 id="act-method"),
                                "merge method ('modelkit methods')", id="row-method")
                yield Static("", id="act-summary")
                yield ParamForm(id="act-params")
                yield field_row("output dtype", Select(
                    [(d, d) for d in MERGE_OUTPUT_DTYPES], value="fp16", allow_blank=False,
                    compact=True, id="act-dtype"), "float dtype merge steps write",
                    id="row-dtype")
                yield field_row("output", Input(
                    placeholder="new file; a relative path is beside the first input",
                    compact=True, id="act-output"))
                yield field_row("verify after", Select(
                    recipes.VERIFY_CHOICES, value="off", allow_blank=False, compact=True,
                    id="act-verify"), "check the new file: static checks (seconds), or "
                    "also render it offline and compare with its input (docs/verify.md)")
                yield field_row("sweep", Input(
                    placeholder=axes_placeholder(None), compact=True, id="act-sweep"),
                    "ctrl+s runs the form once per combination: NAME = values, axes "
                    "separated by ';' (NAME: a parameter, an input a/b/c, dtype, or a "
                    "recipe field path); or a sweep .yaml file")
                yield field_row("sweep folder", Input(compact=True, id="act-sweep-dir"),
                                "where the cells, sweep.jsonl, table.md and the contact "
                                "sheet go (new or empty)")
                yield field_row("sweep jobs", Select(
                    [(str(n), n) for n in JOB_CHOICES], value=1, allow_blank=False,
                    compact=True, id="act-jobs"), "cells at once: 1 runs them one after "
                    "another in this process; more use a process pool")
            with VerticalScroll(id="act-plan-box"):
                yield Static("the form changed: ctrl+p plans it again", id="act-stale")
                yield Static(Text("loading merge methods and operations...", style="dim"),
                             id="act-plan")
        yield JobBar(cancel_key="x or escape", phases=True, id="act-bar")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(JobBar).status("loading merge methods and operations...")
        self.load_transforms()

    def on_resize(self) -> None:
        self.set_class(self.size.width < NARROW_COLUMNS, "narrow")
        self.show_path_end(*self.query("#act-output, #act-sweep-dir").results(Input))

    @on(Input.Blurred, "#act-output, #act-sweep-dir")
    def path_left(self, event: Input.Blurred) -> None:
        self.show_path_end(event.input)

    def on_unmount(self) -> None:
        self.cancel_event.set()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.job is not None
        if action == "back":
            return self.job is None
        if action in ("start", "sweep"):
            return (self.job is None and bool(self.transforms)) or None
        return True

    # --- the form ----------------------------------------------------------

    @work(thread=True, exclusive=True, group="registry", exit_on_error=False,
          description="Loading the transform registry")
    def load_transforms(self) -> None:
        jobs.load_transforms(self)

    def on_transforms_loaded(self, message: TransformsLoaded) -> None:
        self.transforms = message.transforms
        offered = recipes.actions(self.transforms, self.entries)
        self.query_one(JobBar).status("")
        if not offered:
            kinds = ", ".join(sorted({e.kind for e in self.entries}))
            self._plan(Text(f"nothing to do with {kinds} files: mark checkpoints to merge, a "
                            "checkpoint and LoRAs to bake, or one checkpoint to prune, "
                            "quantize or extract", style="yellow"))
            return
        self.query_one("#act-form").disabled = False
        select = self.query_one("#act-action", Select)
        select.set_options([(a, a) for a in offered])
        select.value = offered[0]
        select.focus()
        self.refresh_bindings()

    @property
    def transform(self) -> Transform | None:
        action = self.query_one("#act-action", Select).value
        if action == MERGE:
            action = self.query_one("#act-method", Select).value
        return self.transforms.get(action) if isinstance(action, str) else None

    @on(Select.Changed, "#act-action")
    async def chosen_action_changed(self) -> None:
        merge = self.query_one("#act-action", Select).value == MERGE
        self.query_one("#row-method").display = merge
        self.query_one("#row-dtype").display = merge
        if merge:
            methods = recipes.merge_methods(self.transforms, self.entries)
            method = self.query_one("#act-method", Select)
            method.set_options([(m, m) for m in methods])
            method.value = recipes.default_method(methods, len(self.entries))
        await self.show_transform()

    @on(Select.Changed, "#act-method")
    async def show_transform(self) -> None:
        """Fields, summary and output name for the chosen transform."""
        t = self.transform
        ordered = recipes.arrange(t, self.entries) if t else None
        hints = recipes.block_hints(recipes.block_arch(ordered or self.entries))
        await self.query_one(ParamForm).show(t, len(self.entries), hints)
        summary = Text()
        if t is not None and ordered is not None:
            summary.append(t.summary + "\n")
            summary.append(recipes.inputs_line(t, ordered), style="dim")
        self.query_one("#act-summary", Static).update(summary)
        self.query_one("#act-sweep", Input).placeholder = axes_placeholder(t)
        self.form_changed()
        if self.first_plan and self.spec() is not None:
            self.first_plan = False
            self.action_start(PLAN)

    @on(Input.Changed)
    @on(Select.Changed, "#act-params Select, #act-dtype")
    @on(Switch.Changed)
    def form_changed(self) -> None:
        """Keep the default output name current and say when the plan is stale."""
        spec = self.spec(with_output=False)
        if spec is None:
            return
        field = self.query_one("#act-output", Input)
        if field.value == self.auto_output:  # not edited by the user
            self.auto_output = str(recipes.default_output(spec.action, spec.paths,
                                                          spec.params, spec.method))
            field.value = self.auto_output
            self.show_path_end(field)
        folder = self.query_one("#act-sweep-dir", Input)
        if folder.value == self.auto_sweep_dir:
            root = next((e.root for e in self.entries if e.path == spec.paths[0]), None)
            self.auto_sweep_dir = str(default_sweep_dir(spec, root))
            folder.value = self.auto_sweep_dir
            self.show_path_end(folder)
        self.show_stale()

    def show_path_end(self, *fields: Input) -> None:
        """Scroll path fields (not being edited) to their end: a path longer
        than the field shows its file name, not only its first folders."""
        def scroll() -> None:
            for f in fields:
                if not f.has_focus:
                    f.scroll_to(x=f.max_scroll_x, animate=False, immediate=True)

        self.call_after_refresh(scroll)

    def show_stale(self) -> None:
        """Dim a plan that no longer matches the form."""
        stale = self.previewed is not None and self.spec() != self.previewed
        self.query_one("#act-plan-box").set_class(stale, "stale")

    def spec(self, with_output: bool = True) -> ActSpec | None:
        """What the form says now (None until a transform is chosen)."""
        t = self.transform
        ordered = recipes.arrange(t, self.entries) if t else None
        if t is None or ordered is None:
            return None
        action = self.query_one("#act-action", Select).value
        dtype = self.query_one("#act-dtype", Select).value
        return ActSpec(str(action), tuple(e.path for e in ordered),
                       self.query_one("#act-output", Input).value if with_output else "",
                       self.query_one(ParamForm).values(),
                       t.name if action == MERGE else "", str(dtype))

    # --- plan and run ------------------------------------------------------

    def action_start(self, job: str) -> None:
        """Check the form, then plan (dry run) or run it in a thread worker."""
        spec = self.spec()
        if self.job is not None or spec is None:
            return
        try:
            verify = self.query_one("#act-verify", Select).value if job == RUN else "off"
            recipe = recipes.build_recipe(spec, str(verify))
            output = str(recipes.output_path(spec.output, spec.paths[0]))
        except ModelkitError as exc:
            self.app.push_screen(ErrorDialog(jobs.error_line(exc)))
            return
        self.job, self.cancel_event, self.job_spec = job, threading.Event(), spec
        self.job_output = Path(output)
        self.output_existed = self.job_output.exists()  # refused, unless overwritten
        self.query_one("#act-form").disabled = job == RUN
        self.query_one(JobBar).start(job, "planning" if job == PLAN else
                                     f"writing {Path(output).name}")
        self.refresh_bindings()
        self.run_act(job, recipe, output, self.cancel_event)

    @work(thread=True, exclusive=True, group="act", exit_on_error=False,
          description="Planning or running the recipe")
    def run_act(self, job: str, recipe: Any, output: str, cancel: threading.Event) -> None:
        jobs.run_job(self, job, jobs.act_job(recipe, output, dry_run=job == PLAN), cancel)

    def action_sweep(self) -> None:
        """Check the sweep (its file or axes, every value the recipe checker
        can see) and run it on the sweep screen; planning errors come back
        from there (:meth:`sweep_ended`)."""
        spec = self.spec()
        if self.job is not None or spec is None:
            return
        try:
            sweep = sweep_spec(spec, self.query_one("#act-sweep", Input).value,
                               str(self.query_one("#act-verify", Select).value))
            out = sweep_dir(self.query_one("#act-sweep-dir", Input).value, spec.paths[0])
        except ModelkitError as exc:
            self.app.push_screen(ErrorDialog(jobs.error_line(exc)))
            return
        n_jobs = self.query_one("#act-jobs", Select).value
        self.app.push_screen(SweepScreen(sweep, out, n_jobs if isinstance(n_jobs, int) else 1),
                             self.sweep_ended)

    def sweep_ended(self, error: str | None) -> None:
        """Back from the sweep screen: its error, if it could not start; the
        default sweep folder moves on to a free name."""
        self.form_changed()
        if error:
            self.app.push_screen(ErrorDialog(error))

    def on_job_progress(self, message: JobProgress) -> None:
        if message.job == self.job:
            self.query_one(JobBar).advance(message.progress)

    def on_job_finished(self, message: JobFinished) -> None:
        self._ended()
        report = message.result.report
        self._plan(recipes.plan_text(report, message.result.grid))
        self.previewed = self.job_spec if message.job == PLAN else None
        self.show_stale()
        bar = self.query_one(JobBar)
        if message.job == PLAN:
            bar.stop("planned: ctrl+r writes it")
            return
        self.report = report
        verdict = f"; verify {report.verify.outcome.upper()}" if report.verify else ""
        bar.stop(f"wrote {Path(report.output).name} ({human_bytes(report.output_bytes)}) "
                 f"in {report.seconds:.1f}s{verdict}; escape returns to the library")
        self._written()

    def on_job_failed(self, message: JobFailed) -> None:
        self._ended()
        bar = self.query_one(JobBar)
        # the verify phase runs after the commit: a file may exist all the same
        written = message.job == RUN and not self.output_existed and self.job_output.exists()
        if written:
            self._written()
        what = f"{self.job_output.name} was written, not verified" if written else \
            "no file was written"
        # the pane must not go on showing an earlier run's "wrote ..."
        self.previewed = None
        self.show_stale()
        if message.cancelled:
            bar.stop(f"cancelled: {what}")
            self._plan(Text(f"{'plan' if message.job == PLAN else 'run'} cancelled, " + (
                what if written else "nothing written"), style="yellow"))
            return
        bar.stop(f"{'plan' if message.job == PLAN else 'run'} failed: {what}")
        self._plan(Text(f"{'plan' if message.job == PLAN else 'run'} failed: {what}\n",
                        style="bold red") + Text(safe_text(message.error), style="red"))
        self.app.push_screen(ErrorDialog(message.error))

    def _written(self) -> None:
        """The output exists: the library indexes and selects it; the
        default output name moves on to a free one."""
        if self.library is not None:
            self.library.post_message(LibraryChanged([str(self.job_output)]))
        self.form_changed()

    def _ended(self) -> None:
        self.job = None
        self.query_one("#act-form").disabled = False
        self.refresh_bindings()

    def _plan(self, text: Text) -> None:
        self.query_one("#act-plan", Static).update(text)

    def action_cancel(self) -> None:
        self.cancel_event.set()

    def action_back(self) -> None:
        self.dismiss()
