"""DICOM out and a round trip through a real PACS: DICOM SEG written with highdicom, checked by a
validator and read back; a study retrieved from Orthanc over DICOMweb and its SEG stored back."""

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from imunet.runtime.app.cli import app

from conftest import ROOT

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
runner = CliRunner()
SAMPLE = ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"
ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or not DICOMWEB_PLUGIN.exists(),
    reason="needs Orthanc and its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb)",
)


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="session")
def mr_series(tmp_path_factory):
    """The shipped sample scan as a real MR DICOM series (UIDs, patient, study, geometry)."""
    from dicom_series import write_series

    folder = tmp_path_factory.mktemp("dicom") / "mr"
    study, series, files = write_series(sitk.ReadImage(str(SAMPLE)), folder, "MR", patient_id="PAT-0014")
    return {"folder": folder, "study": study, "series": series, "files": files}


def seg_labels(seg_path, source_files):
    """The label map a DICOM SEG holds, on its source slices' order, read back by highdicom."""
    seg = hd.seg.segread(str(seg_path))
    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in source_files]
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )


def test_a_dicom_series_gives_a_valid_seg_with_the_niftis_labels(mr_series, tmp_path):
    from imunet.runtime.imaging.io import series_files

    code, _, err = run(mr_series["folder"], "--out", tmp_path / "seg.dcm")
    assert code == 0, err
    code, _, err = run(mr_series["folder"], "--out", tmp_path / "seg.nii.gz")
    assert code == 0, err
    strict = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE  # any invalid value fails the read
    try:
        ds = pydicom.dcmread(str(tmp_path / "seg.dcm"))
        ds.PixelData  # noqa: B018 - read every element in strict mode
    finally:
        pydicom.config.settings.reading_validation_mode = strict
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["anterior", "posterior"]
    assert ds.PatientID == "PAT-0014" and ds.StudyInstanceUID == mr_series["study"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == mr_series["series"]
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName.startswith("imunet hippocampus.imunet")
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    np.testing.assert_array_equal(seg_labels(tmp_path / "seg.dcm", series_files(mr_series["folder"], None)), nifti)
    positions = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for f in ds.PerFrameFunctionalGroupsSequence}  # fmt: skip
    sources = {
        tuple(round(float(v), 3) for v in pydicom.dcmread(str(f)).ImagePositionPatient) for f in mr_series["files"]
    }
    assert positions <= sources  # every frame on a source slice


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (Debian package dicom3tools)")
def test_the_seg_passes_dciodvfy(mr_series, tmp_path):
    code, _, err = run(mr_series["folder"], "--out", tmp_path / "seg.dcm")
    assert code == 0, err
    res = subprocess.run(["dciodvfy", str(tmp_path / "seg.dcm")], capture_output=True, text=True, timeout=120)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []


def test_empty_labels_and_a_large_series(tmp_path):
    """A 512 x 512 x 300 series with one structure over 60 slices: the SEG keeps both segments (one
    empty) and only the frames that hold something."""
    from dicom_series import write_series

    from imunet.runtime.contract.bundle import default_bundle_path, load_bundle
    from imunet.runtime.dicom.dicom_seg import segmentation, write_segmentation

    image = sitk.Image((512, 512, 300), sitk.sitkInt16)
    image.SetSpacing((0.8, 0.8, 1.5))
    _, _, files = write_series(image, tmp_path / "big", "MR")
    arr = np.zeros((300, 512, 512), np.uint8)
    arr[100:160, 200:300, 150:260] = 1
    label = sitk.GetImageFromArray(arr)
    t = time.perf_counter()
    ds = segmentation(label, files, load_bundle(default_bundle_path()))
    write_segmentation(ds, tmp_path / "big.dcm")
    seconds = time.perf_counter() - t
    assert ds.NumberOfFrames == 60 and len(ds.SegmentSequence) == 2
    assert (tmp_path / "big.dcm").stat().st_size < 60 * 512 * 512 / 8 * 1.1  # bit-packed frames, nothing more
    assert seconds < 120
    np.testing.assert_array_equal(seg_labels(tmp_path / "big.dcm", files)[100:160], arr[100:160])


def test_a_dcm_output_for_a_nifti_input_is_refused(tmp_path):
    code, _, err = run(SAMPLE, "--out", tmp_path / "x.dcm")
    assert code == 2 and err.count("\n") == 1 and "a DICOM SEG (.dcm) references a DICOM series" in err
    assert not (tmp_path / "x.dcm").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A real Orthanc with its DICOMweb plugin on free local ports, in a temporary folder."""

    def __init__(self, folder: Path, users: dict | None = None, modalities: dict | None = None) -> None:
        import requests

        self.port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "imunet-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.port, "DicomServerEnabled": bool(modalities), "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC", "DicomModalities": modalities or {},
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = next(iter(users.items())) if users else None
        for _ in range(100):
            try:
                requests.get(f"{self.url}/system", auth=self.auth, timeout=1).raise_for_status()
                return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start")

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, files) -> None:
        import requests

        for f in files:
            requests.post(
                f"{self.url}/instances", data=Path(f).read_bytes(), auth=self.auth, timeout=10
            ).raise_for_status()

    def series(self, study: str) -> dict[str, str]:
        import requests

        found = requests.get(f"{self.dicomweb}/studies/{study}/series", auth=self.auth, timeout=10).json()
        return {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in found}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture()
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@needs_orthanc
def test_a_study_on_orthanc_gets_its_seg_back(orthanc, mr_series, tmp_path):
    orthanc.upload(mr_series["files"])
    code, stdout, err = run("--dicomweb", orthanc.dicomweb, "--study", mr_series["study"], "--store",
                            "--out", tmp_path / "local.dcm", "--stats", tmp_path / "s.json")  # fmt: skip
    assert code == 0, err
    segs = [uid for uid, mod in orthanc.series(mr_series["study"]).items() if mod == "SEG"]
    assert len(segs) == 1
    from dicomweb_client.api import DICOMwebClient

    (stored,) = DICOMwebClient(orthanc.dicomweb).retrieve_series(mr_series["study"], segs[0])
    assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and stored.PatientID == "PAT-0014"
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == mr_series["series"]
    assert [s.SegmentLabel for s in stored.SegmentSequence] == ["anterior", "posterior"]
    stored.save_as(str(tmp_path / "from_orthanc.dcm"), enforce_file_format=True)
    code, _, err = run(mr_series["folder"], "--out", tmp_path / "direct.nii.gz")
    assert code == 0, err
    from imunet.runtime.imaging.io import series_files

    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "direct.nii.gz")))
    np.testing.assert_array_equal(
        seg_labels(tmp_path / "from_orthanc.dcm", series_files(mr_series["folder"], None)), nifti
    )
    assert json.loads((tmp_path / "s.json").read_text())["scans"][0]["seg_series"] == segs[0]


@needs_orthanc
def test_server_errors_are_one_line_and_store_nothing(orthanc, mr_series, tmp_path):
    orthanc.upload(mr_series["files"])

    def attempt(*args):
        code, _, err = run(*args)
        failed = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
        assert code == 1 and len(failed) == 1, err
        return failed[0]

    assert "not found on the server" in attempt("--dicomweb", orthanc.dicomweb, "--study", "1.2.3.4", "--store")
    assert "series 9.9.9 is not in study" in attempt(
        "--dicomweb", orthanc.dicomweb, "--study", mr_series["study"], "--series", "9.9.9", "--store"
    )
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert "cannot reach the server" in attempt("--dicomweb", closed, "--study", mr_series["study"], "--store")
    assert set(orthanc.series(mr_series["study"]).values()) == {"MR"}  # nothing stored by the failures
    code, _, _ = run("--dicomweb", orthanc.dicomweb, "--study", mr_series["study"], "--store")
    assert code == 0
    seg_uid = next(uid for uid, mod in orthanc.series(mr_series["study"]).items() if mod == "SEG")
    assert "is not an image series (Modality SEG)" in attempt(
        "--dicomweb", orthanc.dicomweb, "--study", mr_series["study"], "--series", seg_uid, "--store"
    )


@needs_orthanc
def test_credentials_and_timeouts(mr_series, tmp_path, monkeypatch):
    server = Orthanc(tmp_path / "secured", users={"alice": "s3cret"})
    try:
        server.upload(mr_series["files"])
        code, _, err = run("--dicomweb", server.dicomweb, "--study", mr_series["study"], "--store")
        assert code == 1 and "the server wants credentials" in err
        monkeypatch.setenv("IMUNET_DICOMWEB_USER", "alice")
        monkeypatch.setenv("IMUNET_DICOMWEB_PASSWORD", "s3cret")
        code, _, err = run("--dicomweb", server.dicomweb, "--study", mr_series["study"], "--store")
        assert code == 0, err
    finally:
        server.stop()
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    threading.Thread(target=lambda: [silent.accept() for _ in range(4)], daemon=True).start()
    monkeypatch.setenv("IMUNET_DICOMWEB_TIMEOUT", "1")
    code, _, err = run("--dicomweb", f"http://127.0.0.1:{silent.getsockname()[1]}", "--study", "1.2.3", "--store")
    silent.close()
    assert code == 1 and "no complete answer within 1 s" in err


def test_the_cli_refuses_dicomweb_mistakes_before_any_work():
    for args, message in [
        (["--dicomweb", "http://x"], "--dicomweb needs --study UID"),
        (["--dicomweb", "http://x", "--study", "1.2"], "--dicomweb needs --store, --out FILE, or both"),
        ([str(SAMPLE), "--store"], "--study and --store go with --dicomweb"),
        ([], "give scans, folders or DICOM directories, or --dicomweb URL --study UID"),
    ]:
        code, _, err = run(*args)
        assert code == 2 and message in err, err


def strip_attributes(files, keywords, into):
    """Copies of ``files`` in folder ``into`` without ``keywords`` (as anonymising exports leave them)."""
    into.mkdir()
    for f in files:
        ds = pydicom.dcmread(str(f))
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(str(into / f.name), enforce_file_format=True)
    return sorted(into.iterdir())


TYPE2 = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID")


def test_an_anonymised_series_without_type2_attributes_gets_a_seg_and_stays_untouched(mr_series, tmp_path):
    import hashlib

    files = strip_attributes(mr_series["files"], TYPE2, tmp_path / "anon")
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    code, _, err = run(tmp_path / "anon", "--out", tmp_path / "seg.dcm")
    assert code == 0, err
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == before  # the user's files
    ds = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    for keyword in TYPE2:
        assert keyword in ds and ds.get(keyword) in ("", None), keyword  # present, empty (Type 2)


def test_seg_segments_carry_anatomy_laterality_and_colour(mr_series, tmp_path):
    code, _, err = run(mr_series["folder"], "--out", tmp_path / "seg.dcm")
    assert code == 0, err
    ds = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    for segment, part in zip(ds.SegmentSequence, ("Anterior", "Posterior"), strict=True):
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodeMeaning) == ("123037004", "Anatomical Structure")
        assert (kind.CodeValue, kind.CodeMeaning) == ("5366008", "Hippocampus")
        assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == part
        assert len(segment.RecommendedDisplayCIELabValue) == 3
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence]
    assert colours[0] != colours[1]


def test_a_series_without_its_uids_is_refused_before_inference(mr_series, tmp_path, monkeypatch):
    from imunet.runtime.app.pipeline import Segmenter

    def no_inference(*_args, **_kw):
        raise AssertionError("inference ran for a series that cannot make a SEG")

    monkeypatch.setattr(Segmenter, "segment", no_inference)
    strip_attributes(mr_series["files"], ("SOPInstanceUID",), tmp_path / "nouid")
    code, _, err = run(tmp_path / "nouid", "--out", tmp_path / "seg.dcm")
    assert code == 1 and "lacks SOPInstanceUID; a DICOM SEG cannot reference it" in err
    assert not (tmp_path / "seg.dcm").exists() and "inference ran" not in err


def test_a_seg_made_again_is_the_same_object(mr_series, tmp_path):
    """UIDs derived from the source series and the bundle: a resend after a crash is stored once."""
    for name in ("a.dcm", "b.dcm"):
        code, _, err = run(mr_series["folder"], "--out", tmp_path / name)
        assert code == 0, err
    a, b = (pydicom.dcmread(str(tmp_path / n), stop_before_pixels=True) for n in ("a.dcm", "b.dcm"))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != mr_series["series"]


def test_a_source_defect_the_outputs_must_repeat_is_said_in_one_warning(mr_series, tmp_path):
    """Some exports (pydicom's dicomdirtests among them) give the frame of reference the study's UID:
    a SEG or structure set must reference both, so it repeats the defect; the run says so and writes."""
    folder = tmp_path / "same-uid"
    folder.mkdir()
    for f in mr_series["files"]:
        ds = pydicom.dcmread(str(f))
        ds.FrameOfReferenceUID = ds.StudyInstanceUID
        ds.save_as(str(folder / f.name))
    for fmt in ("seg", "rtstruct"):
        out = tmp_path / f"{fmt}.dcm"
        code, _, err = run(folder, "--out", out, "--dicom-format", fmt)
        assert code == 0 and out.is_file(), err
        warned = [ln for ln in err.splitlines() if "FrameOfReferenceUID equals its StudyInstanceUID" in ln]
        assert len(warned) == 1 and warned[0].startswith("WARNING"), err
    code, _, err = run(mr_series["folder"], "--out", tmp_path / "clean.dcm")
    assert code == 0 and "StudyInstanceUID" not in err
