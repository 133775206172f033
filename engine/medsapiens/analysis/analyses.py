"""The cephalometric analyses clinicians read by name, as data: Steiner, Downs, Björk-Jarabak, McNamara, Tweed.

Each measure is its name, its construction (constructions.py: which landmarks, which angle or distance), its unit,
its norm (mean ± SD, with the source beside it) and its reading outside the norm. Landmarks have the ISBI 2015
names (cephalometry.ISBI_19); a measure that needs a landmark the ISBI set lacks names it (UIA / LIA: upper / lower
incisor apex, U6 / L6: upper / lower first molar mesial cusp tips, Co: condylion, Ba: basion, Pt: pterygoid point)
and stays empty, "not computed (missing ...)", unless the landmark set holds it: nothing is guessed.

Constructions where the literature varies (docs/method.md says the same):
- Frankfort horizontal (FH): Po -> Or. Mandibular plane: Go -> Me (Downs, Tweed, Björk's Go-Me), Go -> Gn
  (Steiner's SN-GoGn). Facial plane: N -> Pog. Y-axis: S -> Gn against FH.
- Nasion perpendicular (McNamara): the line through N perpendicular to FH; A and Pog are measured along FH,
  positive in front of it.
- Steiner's incisor distances take the incisor tips UIT / LIT (the ISBI set has no most labial crown point),
  positive in front of NA / NB.
- Gonion is the ISBI landmark Go (not a constructed tangent point); the occlusal plane runs from the molars'
  midpoint (U6, L6) to the incisor tips' midpoint (UIT, LIT).

Norms: the published means of the analyses' authors; where an author gave a mean alone or a range, the SD is the
one the source note names. Readings apply outside mean ± SD.
"""
from __future__ import annotations

from dataclasses import dataclass

from .constructions import Angle, Distance, LineAngle, PointToLine, Ratio, Sum, ToPerpendicular

FH = ("Po", "Or")
SN = ("S", "N")
STEINER_1953 = "Steiner CC, Cephalometrics for you and me, Am J Orthod 39(10):729-755, 1953"
STEINER_SD = STEINER_1953 + " (means; Steiner gives no SD: ± the tolerance used with the analysis)"
DOWNS_1948 = ("Downs WB, Variations in facial relationships: their significance in treatment and prognosis, "
              "Am J Orthod 34(10):812-840, 1948 (mean ± SD of his 20 subjects)")
BJORK_1969 = "Björk A, Prediction of mandibular growth rotation, Am J Orthod 55(6):585-599, 1969"
JARABAK_1972 = ("Jarabak JR, Fizzell JA, Technique and Treatment with Light-Wire Edgewise Appliances, 2nd ed., "
                "Mosby 1972 (a range: its middle ± half its width)")
MCNAMARA_1984 = ("McNamara JA Jr, A method of cephalometric evaluation, Am J Orthod 86(6):449-469, 1984 "
                 "(adult females of the Ann Arbor sample; adult males: A 1.1 ± 2.7, Pog 0.3 ± 3.8, ANS-Me "
                 "74.6 ± 5.0 mm)")
TWEED_1954 = ("Tweed CH, The Frankfort-mandibular incisor angle (FMIA) in orthodontic diagnosis, treatment "
              "planning and prognosis, Angle Orthod 24(3):121-169, 1954 (mean; SD: a quarter of his 16-35° range)")


@dataclass(frozen=True)
class Norm:
    mean: float
    sd: float
    source: str  # author, year, where


@dataclass(frozen=True)
class Measure:
    name: str            # unique in its analysis; the CSV column is "<analysis>.<name>"
    title: str
    construction: object  # constructions.*: landmarks, value(points), drawn
    unit: str            # "deg", "mm" or "%"
    norm: Norm | None = None
    below: str = "below the norm"  # the reading below mean - SD
    above: str = "above the norm"  # ... above mean + SD

    @property
    def landmarks(self) -> tuple:
        return self.construction.landmarks

    @property
    def drawn(self) -> tuple:
        return self.construction.drawn

    @property
    def symbol(self) -> str:
        return {"deg": "°", "mm": " mm", "%": "%"}[self.unit]

    @property
    def norm_text(self) -> str:
        """'82 ± 2°', or '' without a norm."""
        return f"{self.norm.mean:g} ± {self.norm.sd:g}{self.symbol}" if self.norm else ""

    def reading(self, value: float) -> str:
        if self.norm is None:
            return "no norm"
        if value < self.norm.mean - self.norm.sd:
            return self.below
        if value > self.norm.mean + self.norm.sd:
            return self.above
        return "within the norm"


@dataclass(frozen=True)
class Analysis:
    name: str    # what --analysis takes
    title: str
    measures: tuple


def _m(name, title, construction, unit, norm=None, below="below the norm", above="above the norm") -> Measure:
    return Measure(name, title, construction, unit, norm, below, above)


STEINER = Analysis("steiner", "Steiner", (
    _m("SNA", "SNA angle", Angle("S", "N", "A"), "deg", Norm(82, 2, STEINER_SD),
       "retrognathic maxilla", "prognathic maxilla"),
    _m("SNB", "SNB angle", Angle("S", "N", "B"), "deg", Norm(80, 2, STEINER_SD),
       "retrognathic mandible", "prognathic mandible"),
    _m("ANB", "ANB angle (A-N-B, positive when A lies in front of NB)", LineAngle(("N", "B"), ("N", "A"),
                                                                                  "anterior"),
       "deg", Norm(2, 2, STEINER_SD), "Class III skeletal tendency", "Class II skeletal tendency"),
    _m("SN-GoGn", "SN to mandibular plane (Go-Gn)", LineAngle(SN, ("Go", "Gn")), "deg", Norm(32, 5, STEINER_SD),
       "low angle (horizontal growth)", "high angle (vertical growth)"),
    _m("U1-NA_mm", "upper incisor tip to NA", PointToLine("UIT", ("N", "A")), "mm", Norm(4, 2, STEINER_SD),
       "retruded upper incisor", "protruded upper incisor"),
    _m("L1-NB_mm", "lower incisor tip to NB", PointToLine("LIT", ("N", "B")), "mm", Norm(4, 2, STEINER_SD),
       "retruded lower incisor", "protruded lower incisor"),
    _m("Pog-NB_mm", "pogonion to NB (Holdaway: compare with L1-NB)", PointToLine("Pog", ("N", "B")), "mm"),
    _m("U1-NA_deg", "upper incisor axis to NA", LineAngle(("N", "A"), ("UIA", "UIT")), "deg",
       Norm(22, 5, STEINER_SD), "retroclined upper incisor", "proclined upper incisor"),
    _m("L1-NB_deg", "lower incisor axis to NB", LineAngle(("N", "B"), ("LIT", "LIA")), "deg",
       Norm(25, 5, STEINER_SD), "retroclined lower incisor", "proclined lower incisor"),
    _m("U1-L1", "interincisal angle", LineAngle(("UIT", "UIA"), ("LIT", "LIA")), "deg", Norm(131, 6, STEINER_SD),
       "proclined incisors", "upright incisors"),
    _m("OP-SN", "occlusal plane to SN", LineAngle(SN, (("U6", "L6"), ("UIT", "LIT"))), "deg",
       Norm(14, 4, STEINER_SD), "flat occlusal plane", "steep occlusal plane"),
))

DOWNS = Analysis("downs", "Downs", (
    _m("facial", "facial angle (FH to N-Pog)", LineAngle(("Or", "Po"), ("N", "Pog")), "deg",
       Norm(87.8, 3.6, DOWNS_1948), "retrusive chin", "prominent chin"),
    _m("convexity", "angle of convexity (N-A to A-Pog, positive when A lies in front of N-Pog)",
       LineAngle(("N", "A"), ("A", "Pog"), "posterior"), "deg", Norm(0, 5.1, DOWNS_1948),
       "concave profile", "convex profile"),
    _m("AB-plane", "A-B plane angle (N-Pog to A-B, negative when B lies behind A)",
       LineAngle(("N", "Pog"), ("A", "B"), "anterior"), "deg", Norm(-4.6, 3.7, DOWNS_1948),
       "Class II tendency", "Class III tendency"),
    _m("FH-MP", "FH to mandibular plane (Go-Me)", LineAngle(FH, ("Go", "Me")), "deg", Norm(21.9, 3.2, DOWNS_1948),
       "flat mandibular plane", "steep mandibular plane"),
    _m("Y-axis", "Y-axis (S-Gn to FH)", LineAngle(FH, ("S", "Gn")), "deg", Norm(59.4, 3.8, DOWNS_1948),
       "horizontal growth direction", "vertical growth direction"),
    _m("U1-APog_mm", "upper incisor tip to A-Pog", PointToLine("UIT", ("A", "Pog")), "mm",
       Norm(2.7, 1.8, DOWNS_1948), "retrusive upper incisor", "protrusive upper incisor"),
    _m("OP-FH", "cant of the occlusal plane (to FH)", LineAngle(FH, (("U6", "L6"), ("UIT", "LIT"))), "deg",
       Norm(9.3, 3.8, DOWNS_1948), "flat occlusal plane", "steep occlusal plane"),
    _m("U1-L1", "interincisal angle", LineAngle(("UIT", "UIA"), ("LIT", "LIA")), "deg",
       Norm(135.4, 5.8, DOWNS_1948), "proclined incisors", "upright incisors"),
))

_SADDLE, _ARTICULAR, _GONIAL = Angle("N", "S", "Ar"), Angle("S", "Ar", "Go"), Angle("Ar", "Go", "Me")
BJORK = Analysis("bjork", "Björk-Jarabak", (
    _m("saddle", "saddle angle N-S-Ar", _SADDLE, "deg", Norm(123, 5, JARABAK_1972)),
    _m("articular", "articular angle S-Ar-Go", _ARTICULAR, "deg", Norm(143, 6, JARABAK_1972)),
    _m("gonial", "gonial angle Ar-Go-Me", _GONIAL, "deg", Norm(130, 7, JARABAK_1972)),
    _m("sum", "sum of the posterior angles (Björk's polygon)", Sum((_SADDLE, _ARTICULAR, _GONIAL)), "deg",
       Norm(396, 6, BJORK_1969), "counter-clockwise growth rotation", "clockwise growth rotation"),
    _m("upper_gonial", "upper gonial angle Ar-Go-N", Angle("Ar", "Go", "N"), "deg", Norm(53.5, 1.5, JARABAK_1972)),
    _m("lower_gonial", "lower gonial angle N-Go-Me", Angle("N", "Go", "Me"), "deg", Norm(72.5, 2.5, JARABAK_1972)),
    _m("S-Go/N-Me", "posterior / anterior face height (Jarabak ratio)",
       Ratio(Distance("S", "Go"), Distance("N", "Me"), 100.0), "%", Norm(63.5, 1.5, JARABAK_1972),
       "clockwise growth pattern (long face)", "counter-clockwise growth pattern (short face)"),
    _m("S-N", "anterior cranial base S-N", Distance("S", "N"), "mm", Norm(71, 3, JARABAK_1972), "short", "long"),
    _m("S-Ar", "posterior cranial base S-Ar", Distance("S", "Ar"), "mm", Norm(32, 3, JARABAK_1972), "short", "long"),
    _m("Ar-Go", "ramus height Ar-Go", Distance("Ar", "Go"), "mm", Norm(44, 5, JARABAK_1972), "short", "long"),
    _m("Go-Me", "mandibular body Go-Me", Distance("Go", "Me"), "mm", Norm(71, 5, JARABAK_1972), "short", "long"),
    _m("S-Go", "posterior face height S-Go", Distance("S", "Go"), "mm"),
    _m("N-Me", "anterior face height N-Me", Distance("N", "Me"), "mm"),
))

MCNAMARA = Analysis("mcnamara", "McNamara", (
    _m("A-Nperp", "A to the nasion perpendicular", ToPerpendicular("A", "N", FH), "mm",
       Norm(0.4, 2.3, MCNAMARA_1984), "retrusive maxilla", "protrusive maxilla"),
    _m("Pog-Nperp", "Pog to the nasion perpendicular", ToPerpendicular("Pog", "N", FH), "mm",
       Norm(-1.8, 4.5, MCNAMARA_1984), "retrusive mandible", "protrusive mandible"),
    _m("ANS-Me", "lower anterior face height ANS-Me", Distance("ANS", "Me"), "mm",
       Norm(66.7, 4.1, MCNAMARA_1984), "short lower face", "long lower face"),
    _m("Co-A", "midface length Co-A", Distance("Co", "A"), "mm"),
    _m("Co-Gn", "mandibular length Co-Gn", Distance("Co", "Gn"), "mm"),
    _m("facial_axis", "facial axis angle (Ba-N to Pt-Gn)", LineAngle(("N", "Ba"), ("Pt", "Gn")), "deg"),
))

TWEED = Analysis("tweed", "Tweed", (
    _m("FMA", "Frankfort-mandibular plane angle (FH to Go-Me)", LineAngle(FH, ("Go", "Me")), "deg",
       Norm(25, 5, TWEED_1954), "low angle", "high angle"),
    _m("IMPA", "incisor-mandibular plane angle", LineAngle(("Me", "Go"), ("LIA", "LIT")), "deg",
       Norm(90, 5, TWEED_1954), "retroclined lower incisor", "proclined lower incisor"),
    _m("FMIA", "Frankfort-mandibular incisor angle", LineAngle(("Or", "Po"), ("LIT", "LIA")), "deg",
       Norm(65, 5, TWEED_1954), "proclined lower incisor", "retroclined lower incisor"),
))

NAMED = {a.name: a for a in (STEINER, DOWNS, BJORK, MCNAMARA, TWEED)}
