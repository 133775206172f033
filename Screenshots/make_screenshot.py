"""The Extensions Index screenshot and the README's picture (Screenshots/result.png): a radiograph with the
landmarks the module detected on it, drawn by Slicer's own slice view (trame-slicer's SlicerApp: Slicer's MRML
displayable managers rendering through VTK offscreen), the points to check in the other colour.

    .venv/bin/python Screenshots/make_screenshot.py

Needs the `web` extra (trame-slicer, slicer-layer-dm). The detection is the panel's own: PanelLogic adds three
annotated cases to its table and detects on a fourth image in the engine worker; the result node is drawn as
Slicer draws it (labels; the points the review rule flags unselected, so in the display node's other colour).

The published picture is a phantom radiograph (api.phantom_case): the shared cephalograms carry no licence
beyond evaluation and testing, so none of them is published. `--data ../shared/data/ceph_hamedan --out
/tmp/ceph.png` renders one of them for a look on this machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "result.png"
SIZE = (1200, 900)  # px: the Extensions Index shows it about 800 px wide
CAPTION_PX = 80  # the band at the bottom that holds the caption


def render(out: Path, atlas: list, target, size=SIZE, title: str = "") -> dict:
    """Detect on `target` (a medsapiens.Case) with the atlas of `atlas` (annotated Cases) as the panel does, and
    write the slice view showing the result to `out`. Returns what a test checks: the result node's points
    (world RAS) with their labels and flags, and the pixel (x, y from the top left) where each is drawn."""
    from medsapiens.web import use_slicer_lib
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    use_slicer_lib()
    from MedSapiensSlicerLib.panel import PanelLogic, PanelState

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    logic = PanelLogic(app.scene)
    with tempfile.TemporaryDirectory(prefix="medsapiens-screenshot-") as folder:
        try:
            for case in atlas:
                volume, points = _load(app, case, Path(folder))
                logic.addCase(volume, points)
                points.GetDisplayNode().SetVisibility(False)
            p = PanelState(inputVolume=_load(app, target, Path(folder))[0])
            job = logic.wait(logic.startDetectFor(p))
            if job.error:
                raise RuntimeError(job.error)
            logic.finishJob(job, p)
        finally:
            logic.shutdown()
    app.display_manager.show_volume_in_slice_background(p.inputVolume)
    view.render_window().SetSize(*size)
    app.display_manager.reset_views()
    _leave_room_below(app.scene.GetNodeByID(view.get_view_node_id()), size[1], CAPTION_PX)
    _caption(view, title or f"MedSapiens for 3D Slicer: {p.outputMarkups.GetName()}, detected by the atlas of "
                            f"{len(atlas)} annotated cases", p.outputMarkups.GetDisplayNode())
    view.render()
    _save(view.render_window(), out)
    return _drawn(p.outputMarkups, view, size)


def _load(app, case, folder: Path):
    """The case as a NRRD and (with landmarks) a .mrk.json, opened by Slicer's own readers: (volume, points)."""
    import numpy as np
    import SimpleITK as sitk
    from medsapiens.io.markups import write_markups

    image = sitk.GetImageFromArray(np.asarray(case.image))
    image.SetSpacing(tuple(float(s) for s in case.spacing))
    folder = folder / case.name  # a folder each: Slicer's reader takes numbered files in one folder as a series
    folder.mkdir()
    path = folder / f"{case.name}.nrrd"
    sitk.WriteImage(image, str(path))
    volume = app.io_manager.load_volumes(str(path))[0]
    volume.SetName(case.name)
    if case.landmarks is None:
        return volume, None
    write_markups(folder / f"{case.name}.mrk.json", case.landmarks, case)
    points = app.scene.GetNodeByID(app.markups_logic.LoadMarkups(str(folder / f"{case.name}.mrk.json")))
    return volume, points


def _leave_room_below(slice_node, height: int, band: int) -> None:
    """Fit the image (as reset_views fitted it) into the view above a band of `band` px for the caption, so that
    no point is drawn under it: a wider field of view, the centre moved down the view's own up axis."""
    fov = slice_node.GetFieldOfView()
    grow = height / (height - band)
    slice_node.SetFieldOfView(fov[0] * grow, fov[1] * grow, fov[2])
    mm_per_px = fov[1] * grow / height
    slice_to_ras = slice_node.GetSliceToRAS()
    for row in range(3):  # column 1 is the view's up direction in RAS
        slice_to_ras.SetElement(row, 3, slice_to_ras.GetElement(row, 3) - slice_to_ras.GetElement(row, 1) *
                                mm_per_px * band / 2)
    slice_node.UpdateMatrices()


def _caption(view, title: str, display) -> None:
    """What the picture shows, in the view's bottom left corner; the key in the colours the points are drawn in
    (the display node's selected colour for the points found, its other colour for those to check)."""
    import vtk

    lines = [(title, (1.0, 1.0, 1.0), 0), ("found (locked)", display.GetSelectedColor(), 0),
             ("to check (unlocked, for review)", display.GetColor(), 190)]
    for n, (text, colour, x) in enumerate(lines):
        actor = vtk.vtkTextActor()
        actor.SetInput(text)
        prop = actor.GetTextProperty()
        prop.SetFontSize(22)
        prop.SetColor(*colour)
        prop.SetBackgroundColor(0.0, 0.0, 0.0)
        prop.SetBackgroundOpacity(0.6)  # readable over the image
        actor.SetDisplayPosition(14 + x, 44 if n == 0 else 14)
        view.renderer().AddViewProp(actor)


def _save(window, out: Path) -> None:
    """The view as a 256-colour PNG (small enough for the repository)."""
    import numpy as np
    import vtk
    from PIL import Image
    from vtk.util.numpy_support import vtk_to_numpy

    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    data = grab.GetOutput()
    width, height, _ = data.GetDimensions()
    pixels = vtk_to_numpy(data.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).quantize(256).save(out, optimize=True)


def _drawn(node, view, size) -> dict:
    """The result's points: label, world RAS, whether it is to check, and where the view draws it (through the
    slice node's own XY -> RAS matrix)."""
    import numpy as np
    import vtk

    xy_to_ras = vtk.vtkMatrix4x4()
    xy_to_ras.DeepCopy(node.GetScene().GetNodeByID(view.get_view_node_id()).GetXYToRAS())
    xy_to_ras.Invert()
    points = []
    for i in range(node.GetNumberOfControlPoints()):
        ras = node.GetNthControlPointPositionWorld(i)
        x, y, _, _ = xy_to_ras.MultiplyPoint([*ras, 1.0])
        points.append({"label": node.GetNthControlPointLabel(i), "ras": np.array(ras), "pixel": (x, size[1] - 1 - y),
                       "check": "check" in node.GetNthControlPointDescription(i)})
    return {"node": node.GetName(), "points": points}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the PNG to write (default {OUT})")
    parser.add_argument("--data", type=Path, help="a data set folder with landmarks.csv (e.g. ceph_hamedan): its "
                                                  "cases 1-3 annotate, its case 4 is detected on (default: phantoms)")
    args = parser.parse_args(argv)
    from medsapiens import api

    if args.data:
        cases = api.load_cases(args.data / "landmarks.csv")[:4]
        atlas, target = cases[:3], cases[3]
    else:
        atlas, target = [api.phantom_case(seed) for seed in (0, 1, 2)], api.phantom_case(7)
    target.landmarks = None  # the image alone, as a user opens it
    drawn = render(args.out, atlas, target)
    flagged = [p["label"] for p in drawn["points"] if p["check"]]
    print(args.out)
    print(f"{drawn['node']}: {len(drawn['points'])} points, to check: {', '.join(flagged) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
