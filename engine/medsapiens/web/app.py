"""One browser session's page: trame-slicer's Slicer application (this process's own MRML scene, its slice view
rendered by Slicer's displayable managers and streamed to the page, mouse events sent back, so markups are
placed and dragged as in Slicer) beside the panel. Every control calls one WebSession method (session.py) and
shows what it returns; the engine's replies are applied every WebSettings.poll_seconds.

Run by the front door (server.py) as `python -m medsapiens.web.app --host H --port P [--data DIR]`, one process
per browser session; it ends WebSettings.idle_seconds after its page closed, or when the front door is gone.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

from trame.app import TrameApp
from trame.app.file_upload import ClientFile
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_vuetify.ui.vuetify3 import SinglePageLayout

from medsapiens import api

from .session import WebSession

log = logging.getLogger("medsapiens.web")
SETTINGS = api.WEB_DEFAULTS


class SessionApp(TrameApp):
    def __init__(self, folder: Path, data_dir: Path | None = None, server=None):
        super().__init__(server)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layouts.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layouts.set_layout("Axial Only")
        self.session = WebSession(self.slicer, folder, data_dir)
        self._shownPoints = None
        self._build()
        self._refresh()
        for name, handler in (("input_volume", self._on_select), ("training_markups", self._on_select),
                              ("output_markups", self._on_select), ("points_visible", self._on_points_visible),
                              ("points_editable", self._on_points_editable), ("model", self._on_options),
                              ("view", self._on_options), ("time_budget", self._on_options),
                              ("atlas_deformable", self._on_options), ("learn_unannotated", self._on_options),
                              ("use_atlas_adapter", self._on_options)):
            self.state.change(name)(handler)
        self.server.controller.on_server_ready.add(lambda **_: asyncio.ensure_future(self._poll_forever()))

    # --------------------------------------------------------------------------------------------- the page
    def _build(self) -> None:
        trigger = self.server.controller.trigger_name
        with SinglePageLayout(self.server, full_height=True) as ui:
            ui.title.set_text("MedSapiens")
            with ui.content, v.VContainer(fluid=True, classes="pa-0 fill-height"), \
                    v.VRow(no_gutters=True, classes="fill-height"):
                with v.VCol(cols=4, classes="pa-3", style="overflow-y: auto; height: calc(100vh - 64px)"):
                    self._files(trigger)
                    self._cases()
                    self._jobs()
                    self._results(trigger)
                with v.VCol(cols=8, id="view", style="height: calc(100vh - 64px)"):
                    self.layouts.initialize_layout_grid(ui)

    def _files(self, trigger) -> None:
        v.VFileInput(id="upload", label="Upload images and points (.mrk.json)", multiple=True, density="compact",
                     change=f"trigger('{trigger(self._upload)}', [$event.target.files])")
        with html.Div(v_if="server_files.length", classes="d-flex"):
            v.VSelect(id="server-file", v_model=("server_file", None), items=("server_files", []),
                      label="Image of the server's folder", density="compact")
            v.VBtn("Open", id="open-server-file", click=self._open_server_file)
        v.VSelect(id="input-volume", v_model=("input_volume", None), items=("volumes", []), item_title="title",
                  item_value="value", label="Input volume", density="compact")
        v.VSelect(id="view-choice", v_model=("view", self.session.p.view), items=("views", []),
                  label="Analyse", density="compact")
        html.Div("{{ status }}", id="status", classes="text-body-2 my-2", style="white-space: pre-wrap")

    def _cases(self) -> None:
        v.VSelect(id="training-markups", v_model=("training_markups", None), items=("markups", []),
                  item_title="title", item_value="value", label="Annotated points", density="compact")
        v.VBtn("Add case", id="add-case", click=self._add_case, block=True, disabled=("busy", False))
        with html.Table(id="cases", classes="text-caption my-2", style="width: 100%"):
            with html.Tr(v_for="(row, i) in cases", key="i"):
                html.Td("{{ cell }}", v_for="cell in row")
                with html.Td():
                    v.VBtn("Remove", size="x-small", click=(self._remove_case, "[i]"))
        # Issue 21 places its "Annotate this image" template control here, calling a WebSession method.

    def _jobs(self) -> None:
        v.VSelect(id="model", v_model=("model", self.session.p.model), items=("models", []), label="Model",
                  density="compact")
        v.VCheckbox(v_model=("atlas_deformable", False), label="B-spline stage", density="compact",
                    hide_details=True, disabled=("!atlas_options.deformable",))
        v.VCheckbox(v_model=("learn_unannotated", True), label="Also learn from the other open 2D images",
                    density="compact", hide_details=True, disabled=("!atlas_options.learnUnannotated",))
        v.VCheckbox(v_model=("use_atlas_adapter", True), label="Use my fine-tuned adapter", density="compact",
                    hide_details=True, disabled=("!atlas_options.useAdapter",))
        v.VTextField(id="time-budget", v_model=("time_budget", self.session.p.timeBudget), type="number",
                     label="Training time (s)", density="compact")
        with html.Div(classes="d-flex ga-2"):
            v.VBtn("Fine-tune", id="finetune", click=(self._start, "['finetune']"), disabled=("busy", False))
            v.VBtn("Detect", id="detect", click=(self._start, "['detect']"), disabled=("busy", False))
            v.VBtn("Cancel", id="cancel", click=self._cancel, disabled=("!busy", True))
        v.VProgressLinear(id="progress", model_value=("progress", 0), height=8, classes="my-2")
        html.Div("{{ adapter_estimate }}", id="adapter-estimate", classes="text-caption")

    def _results(self, trigger) -> None:
        v.VSelect(id="output-markups", v_model=("output_markups", None), items=("markups", []),
                  item_title="title", item_value="value", label="Result points", density="compact")
        v.VCheckbox(id="show-points", v_model=("points_visible", True), label="Show points", density="compact",
                    hide_details=True)
        v.VCheckbox(id="edit-points", v_model=("points_editable", False), label="Unlock points to drag them",
                    density="compact", hide_details=True)
        with html.Table(id="points", classes="text-caption", style="width: 100%"):
            with html.Tr(v_for="(row, i) in points", key="i"):
                html.Td("{{ cell }}", v_for="cell in row")
        v.VBtn("Download points (.mrk.json)", id="download-points", block=True, classes="my-2",
               disabled=("!points.length", True),
               click=f"utils.download(points_file, trigger('{trigger(self._points_file)}'), 'application/json')")
        with html.Div(v_if="analysis.length"):
            with html.Table(id="analysis", classes="text-caption", style="width: 100%"):
                with html.Tr(v_for="(row, i) in analysis", key="i"):
                    html.Td("{{ cell }}", v_for="cell in row")
            v.VBtn("Export analysis as CSV", id="download-analysis", block=True,
                   click=f"utils.download(analysis_file, trigger('{trigger(self._analysis_file)}'), 'text/csv')")
        # Issue 22 places its report download here (a WebSession method calling api.write_report), and issue 21
        # its review list of flagged points under the points table.

    # ------------------------------------------------------------------------------------- state <-> session
    def _refresh(self) -> None:
        """Put what the session holds into the page's state."""
        s, p, state = self.session, self.session.p, self.state
        nodes = lambda mrmlClass: [{"title": name, "value": i} for i, name in s.nodes(mrmlClass)]  # noqa: E731
        state.volumes, state.markups = nodes("vtkMRMLScalarVolumeNode"), nodes("vtkMRMLMarkupsFiducialNode")
        state.input_volume = p.inputVolume.GetID() if p.inputVolume else None
        state.training_markups = p.trainingMarkups.GetID() if p.trainingMarkups else None
        state.output_markups = p.outputMarkups.GetID() if p.outputMarkups else None
        state.models, state.views, state.server_files = s.modelChoices(), s.viewChoices(), s.serverFiles()
        state.cases = [list(row) for row in s.caseTable()]
        state.status, state.busy, state.progress = s.status, s.job is not None, round(100 * s.progress)
        options = s.logic.atlasOptions(p)
        state.atlas_options = {"deformable": options.deformable, "learnUnannotated": options.learnUnannotated,
                               "useAdapter": options.useAdapter}
        state.adapter_estimate = s.logic.adapterSummary(s.logic.adapterInfo(p.atlasAdapter))
        self._refreshPoints()

    def _refreshPoints(self) -> bool:
        points = [[r.label, *(f"{c:.1f}" for c in r.ras), r.description] for r in self.session.points()]
        if points == self._shownPoints:
            return False
        self._shownPoints = self.state.points = points
        rows = self.session.analysis() or []
        self.state.analysis = [list(r.cells()) for r in rows]
        node = self.session.p.outputMarkups
        self.state.points_file = f"{node.GetName()}.mrk.json" if node else "points.mrk.json"
        self.state.analysis_file = f"{node.GetName()} analysis.csv" if node else "analysis.csv"
        return True

    def _on_select(self, input_volume=None, training_markups=None, output_markups=None, **_):
        self.session.select(input_volume, training_markups, output_markups)
        self._refreshPoints()

    def _on_points_visible(self, points_visible=True, **_):
        self.session.setPointsVisible(points_visible)

    def _on_points_editable(self, points_editable=False, **_):
        self.session.setPointsEditable(points_editable)

    def _on_options(self, model, view, time_budget, atlas_deformable, learn_unannotated, use_atlas_adapter, **_):
        from MedSapiensSlicerLib.panel import TIME_BUDGET_RANGE

        p = self.session.p
        p.model, p.view = model, view
        try:
            p.timeBudget = min(max(float(time_budget), TIME_BUDGET_RANGE[0]), TIME_BUDGET_RANGE[1])
        except (TypeError, ValueError):
            pass  # a half-typed number: the last valid one stays
        p.atlasDeformable, p.learnUnannotated = bool(atlas_deformable), bool(learn_unannotated)
        p.useAtlasAdapter = bool(use_atlas_adapter)
        self._refresh()

    # ------------------------------------------------------------------------------------------ the controls
    def _upload(self, files) -> None:
        self.session.upload([(ClientFile(f).name, ClientFile(f).content or b"") for f in files or []])
        self._refresh()

    def _open_server_file(self) -> None:
        self.session.openServerFile(self.state.server_file or "")
        self._refresh()

    def _add_case(self) -> None:
        self.session.addCase()
        self._refresh()

    def _remove_case(self, index) -> None:
        self.session.removeCase(int(index))
        self._refresh()

    def _start(self, kind) -> None:
        self.session.start(kind)
        self._refresh()

    def _cancel(self) -> None:
        self.session.cancel()
        self._refresh()

    def _points_file(self):
        return self.server.protocol.addAttachment(self.session.pointsFile()[1])

    def _analysis_file(self):
        return self.server.protocol.addAttachment(self.session.analysisFile()[1])

    async def _poll_forever(self) -> None:
        """Apply the engine worker's replies to the page; a failure here is one status line, never the end of the
        page (a crashed worker is reported by its job and restarted by the next request)."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(SETTINGS.poll_seconds)
            if os.getppid() != parent:  # the front door is gone
                self.server.stop()
                return
            try:
                changed = self.session.poll()
                with self.state:
                    self._refresh() if changed else self._refreshPoints()
            except Exception as e:  # noqa: BLE001  (shown, and the page keeps going)
                log.exception("poll failed")
                with self.state:
                    self.state.status = f"Error: {e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsapiens.web.app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="medsapiens-web-"))
    app = SessionApp(folder, args.data)
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, timeout=SETTINGS.idle_seconds,
                         show_connection_info=False)
    finally:
        app.session.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
