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

from .session import FROM_FILE, POINTS, VOLUME, WebSession

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
                              ("use_atlas_adapter", self._on_options), ("landmark_set", self._on_landmark_set),
                              ("analysis_name", self._on_analysis),
                              ("tracing_visible", self._on_tracing_visible)):
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
                    self._cases(trigger)
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

    def _cases(self, trigger) -> None:
        v.VSelect(id="landmark-set", v_model=("landmark_set", self.session.p.landmarkSet),
                  items=("landmark_sets", []), label="Landmark set", density="compact")
        v.VFileInput(id="landmark-set-file", v_if=f"landmark_set === {FROM_FILE!r}", density="compact",
                     label="Landmark set file (CSV name,description, or JSON)",
                     change=f"trigger('{trigger(self._upload_landmark_set)}', [$event.target.files])")
        with html.Div(classes="d-flex ga-2"):
            v.VBtn("Annotate this image", id="annotate", click=self._acting(self.session.annotate))
            v.VBtn("Skip landmark", id="skip-landmark", click=self._acting(self.session.skipLandmark),
                  disabled=("!placing", True))
        html.Div("{{ placement }}", id="placement", classes="text-body-2 my-2")
        v.VSelect(id="training-markups", v_model=("training_markups", None), items=("markups", []),
                  item_title="title", item_value="value", label="Annotated points", density="compact")
        v.VBtn("Add case", id="add-case", click=self._acting(self.session.addCase), block=True,
               disabled=("busy", False))
        with html.Table(id="cases", classes="text-caption my-2", style="width: 100%"):
            with html.Tr(v_for="(row, i) in cases", key="i"):
                html.Td("{{ cell }}", v_for="cell in row")
                with html.Td():
                    v.VBtn("Remove", size="x-small", click=(self._acting(self.session.removeCase), "[i]"))

    def _jobs(self) -> None:
        v.VSelect(id="model", v_model=("model", self.session.p.model), items=("models", []), label="Model",
                  density="compact")
        v.VCheckbox(v_model=("atlas_deformable", False), label="Always B-spline stage", density="compact",
                    hide_details=True, disabled=("!atlas_options.deformable",))
        v.VCheckbox(v_model=("learn_unannotated", True), label="Also learn from the other open 2D images",
                    density="compact", hide_details=True, disabled=("!atlas_options.learnUnannotated",))
        v.VCheckbox(v_model=("use_atlas_adapter", True), label="Use my fine-tuned adapter", density="compact",
                    hide_details=True, disabled=("!atlas_options.useAdapter",))
        v.VTextField(id="time-budget", v_model=("time_budget", self.session.p.timeBudget), type="number",
                     label="Training time (s)", density="compact")
        start = self._acting(self.session.start)
        with html.Div(classes="d-flex ga-2"):
            v.VBtn("Fine-tune", id="finetune", click=(start, "['finetune']"), disabled=("busy", False))
            v.VBtn("Detect", id="detect", click=(start, "['detect']"), disabled=("busy", False))
            v.VBtn("Cancel", id="cancel", click=self._acting(self.session.cancel), disabled=("!busy", True))
        v.VProgressLinear(id="progress", model_value=("progress", 0), height=8, classes="my-2")
        html.Div("{{ adapter_estimate }}", id="adapter-estimate", classes="text-caption")

    def _results(self, trigger) -> None:
        v.VSelect(id="output-markups", v_model=("output_markups", None), items=("markups", []),
                  item_title="title", item_value="value", label="Result points", density="compact")
        v.VCheckbox(id="show-points", v_model=("points_visible", True), label="Show points", density="compact",
                    hide_details=True)
        v.VCheckbox(id="edit-points", v_model=("points_editable", False), label="Unlock points to drag them",
                    density="compact", hide_details=True)
        with html.Div(v_if="review_line", id="review-list", classes="my-2"):
            html.Div("{{ review_line }}", id="review-line", classes="text-body-2")
            with html.Table(id="review", classes="text-caption", style="width: 100%"):
                with html.Tr(v_for="(row, i) in review", key="i", click=(self.session.jumpToPoint, "[row.index]"),
                             style="cursor: pointer", classes="review-row"):
                    html.Td("{{ cell }}", v_for="cell in row.cells")
            v.VBtn("Add as case", id="add-reviewed-case", block=True, disabled=("busy", False),
                   click=self._acting(self.session.addReviewedCase))
        with html.Div(style="max-height: 30vh; overflow-y: auto"):
            with html.Table(id="points", classes="text-caption", style="width: 100%"):
                with html.Tr(v_for="(row, i) in points", key="i"):
                    html.Td("{{ cell }}", v_for="cell in row")
        v.VBtn("Download points (.mrk.json)", id="download-points", block=True, classes="my-2",
               disabled=("!points.length", True),
               click=self._download("points_file", self._points_file, "application/json"))
        with html.Div(v_if="analysis.length"):
            v.VSelect(id="analysis-choice", v_model=("analysis_name", self.session.p.analysis),
                      items=("analyses", []), item_title="title", item_value="value", label="Analysis",
                      density="compact")
            v.VCheckbox(id="show-tracing", v_model=("tracing_visible", self.session.p.showTracing),
                        label="Show tracing", density="compact", hide_details=True)
            with html.Table(id="analysis", classes="text-caption", style="width: 100%"):
                with html.Tr(v_for="(row, i) in analysis", key="i"):
                    html.Td("{{ cell }}", v_for="cell in row")
            v.VBtn("Export analysis as CSV", id="download-analysis", block=True, classes="my-2",
                   click=self._download("analysis_file", self._analysis_file, "text/csv"))
            v.VBtn("Make report", id="make-report", block=True, disabled=("busy", False),
                   click=self._acting(self.session.startReport))
            with html.Div(v_if="report_ready", classes="d-flex ga-2 my-2"):
                v.VBtn("Download report (HTML)", id="download-report",
                       click=self._download("report_file + '.html'", self._report_file, "text/html", "['html']"))
                v.VBtn("PDF", id="download-report-pdf",
                       click=self._download("report_file + '.pdf'", self._report_file, "application/pdf", "['pdf']"))

    def _download(self, name: str, method, mime: str, args: str = "") -> str:
        """A click that downloads what `method` returns (an attachment) as the file named by the JS `name`."""
        call = f"'{self.server.controller.trigger_name(method)}'" + (f", {args}" if args else "")
        return f"utils.download({name}, trigger({call}), '{mime}')"

    # ------------------------------------------------------------------------------------- state <-> session
    def _refresh(self) -> None:
        """Put what the session holds into the page's state."""
        s, p, state = self.session, self.session.p, self.state
        nodes = lambda mrmlClass: [{"title": name, "value": i} for i, name in s.nodes(mrmlClass)]  # noqa: E731
        state.volumes, state.markups = nodes(VOLUME), nodes(POINTS)
        state.input_volume = p.inputVolume.GetID() if p.inputVolume else None
        state.training_markups = p.trainingMarkups.GetID() if p.trainingMarkups else None
        state.output_markups = p.outputMarkups.GetID() if p.outputMarkups else None
        state.models, state.views, state.server_files = s.modelChoices(), s.viewChoices(), s.serverFiles()
        state.landmark_sets, state.landmark_set = s.landmarkSetChoices(), p.landmarkSet
        state.analyses = [{"title": title, "value": name} for name, title in s.analysisChoices().items()]
        state.cases = [list(row) for row in s.caseTable()]
        state.status, state.busy, state.progress = s.status, s.job is not None, round(100 * s.progress)
        options = s.logic.atlasOptions(p)
        state.atlas_options = {"deformable": options.deformable, "learnUnannotated": options.learnUnannotated,
                               "useAdapter": options.useAdapter}
        state.adapter_estimate = s.logic.adapterSummary(s.logic.adapterInfo(p.atlasAdapter))
        self._refreshPoints()

    def _refreshPoints(self) -> bool:
        """The points as they are now: the result's table, its review list, the landmark to place next, and (when
        any changed) the analysis table. True when the page changed."""
        s, state = self.session, self.state
        points = [r.cells() for r in s.points()]
        rows = s.reviewRows()
        review = [{"cells": list(r.cells()), "index": r.index} for r in rows]
        shown = (points, review, s.reviewLine(rows), s.placementLine(), s.placing(), s.reportReady(), s.p.analysis)
        if shown == self._shownPoints:
            return False
        self._shownPoints = shown
        state.points, state.review, state.review_line, state.placement, state.placing, state.report_ready, _ = shown
        state.analysis = [list(r.cells()) for r in s.analysis() or []]
        node = s.p.outputMarkups
        state.points_file = f"{node.GetName()}.mrk.json" if node else "points.mrk.json"
        state.analysis_file = f"{node.GetName()} analysis.csv" if node else "analysis.csv"
        state.report_file = f"{node.GetName()} report" if node else "report"
        return True

    def _on_select(self, input_volume=None, training_markups=None, output_markups=None, **_):
        self.session.select(input_volume, training_markups, output_markups)
        self._refreshPoints()

    def _on_points_visible(self, points_visible=True, **_):
        self.session.setPointsVisible(points_visible)

    def _on_points_editable(self, points_editable=False, **_):
        self.session.setPointsEditable(points_editable)

    def _on_landmark_set(self, landmark_set=None, **_):
        self.session.chooseLandmarkSet(landmark_set)
        self.state.landmark_set = self.session.p.landmarkSet

    def _on_tracing_visible(self, tracing_visible=True, **_):
        self.session.setTracingVisible(tracing_visible)

    def _on_analysis(self, analysis_name=None, **_):
        self.session.chooseAnalysis(analysis_name)
        self._refreshPoints()

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

    def _upload_landmark_set(self, files) -> None:
        for f in (files or [])[:1]:
            self.session.uploadLandmarkSet(ClientFile(f).name, ClientFile(f).content or b"")
        self._refresh()

    def _acting(self, action):
        """A control's handler: the session's `action` with what the page sends, then the page redrawn."""
        def act(*args):
            action(*args)
            self._refresh()

        return act

    def _points_file(self):
        return self.server.protocol.addAttachment(self.session.pointsFile()[1])

    def _analysis_file(self):
        return self.server.protocol.addAttachment(self.session.analysisFile()[1])

    def _report_file(self, suffix):
        return self.server.protocol.addAttachment(self.session.reportFile(str(suffix))[1])

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
