"""imunet-serve as a DICOM node against a real Orthanc: Orthanc pushes a study (its REST
``/modalities/{id}/store``), the node is SIGKILLed after the series arrived and restarted on the same
spool, and the segmentation arrives back in Orthanc exactly once, also when the study is sent again."""

import subprocess
import sys
import time

import pytest

pytest.importorskip("pynetdicom")
requests = pytest.importorskip("requests")

from test_dicom import Orthanc, free_port, mr_series, needs_orthanc  # noqa: E402, F401  (mr_series: a fixture)


def start_node(port, orthanc, spool, log, *extra):
    cmd = [sys.executable, "-m", "imunet.runtime.app.serve_cli", "--port", str(port), "--host", "127.0.0.1",
           "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--spool", str(spool), "--quiet-seconds", "2",
           *extra]  # fmt: skip
    node = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("a"))
    for _ in range(300):
        if "listening on" in log.read_text():
            return node
        time.sleep(0.1)
    node.kill()
    raise AssertionError(f"imunet-serve did not start: {log.read_text()}")


def push(orthanc, study):
    ids = requests.post(f"{orthanc.url}/tools/lookup", data=study, timeout=10).json()
    study_id = next(r["ID"] for r in ids if r["Type"] == "Study")
    res = requests.post(f"{orthanc.url}/modalities/imunet/store", json={"Resources": [study_id], "Synchronous": True},
                        timeout=120)  # fmt: skip
    res.raise_for_status()


def segs(orthanc, study):
    return [uid for uid, modality in orthanc.series(study).items() if modality == "SEG"]


@needs_orthanc
def test_a_study_pushed_to_the_node_comes_back_segmented_once_across_a_kill(mr_series, tmp_path):  # noqa: F811
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"imunet": ["IMUNET", "127.0.0.1", port]})
    spool, log = tmp_path / "spool", tmp_path / "node.log"
    log.write_text("")
    try:
        orthanc.upload(mr_series["files"])
        node = start_node(port, orthanc, spool, log)
        push(orthanc, mr_series["study"])
        node.kill()  # SIGKILL once the series is in the spool, before it is complete
        node.wait()
        received = list((spool / "incoming" / mr_series["series"]).glob("*.dcm"))
        assert len(received) == len(mr_series["files"])  # every acknowledged instance was on disk
        node = start_node(port, orthanc, spool, log)
        for _ in range(600):
            if segs(orthanc, mr_series["study"]) and "segmented" in log.read_text():
                break
            time.sleep(0.1)
        push(orthanc, mr_series["study"])  # the same study again: already dealt with
        time.sleep(4)
        node.terminate()
        node.wait(timeout=30)
        found = segs(orthanc, mr_series["study"])
        assert len(found) == 1, log.read_text()
        instances = requests.get(f"{orthanc.dicomweb}/studies/{mr_series['study']}/series/{found[0]}/instances",
                                 timeout=10).json()  # fmt: skip
        assert len(instances) == 1
        assert "REFUSED" not in log.read_text() and "ignored series" in log.read_text()  # its own SEG, sent back
        lines = [ln for ln in log.read_text().splitlines() if "segmented" in ln]
        assert len(lines) == 1 and f"series {mr_series['series']}" in lines[0] and "seg sent to ORTHANC" in lines[0]
        assert not (spool / "incoming" / mr_series["series"]).exists()  # no patient data kept once done
    finally:
        orthanc.stop()


@needs_orthanc
def test_a_series_of_another_modality_is_refused_in_the_log_not_sent(tmp_path):
    import SimpleITK as sitk
    from dicom_series import write_series

    from conftest import ROOT

    image = sitk.ReadImage(str(ROOT / "runtime" / "default" / "sample" / "hippocampus_014_0000.nii.gz"))
    study, series, files = write_series(image, tmp_path / "ct", "CT")
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"imunet": ["IMUNET", "127.0.0.1", port]})
    spool, log = tmp_path / "spool", tmp_path / "node.log"
    log.write_text("")
    try:
        orthanc.upload(files)
        node = start_node(port, orthanc, spool, log)
        push(orthanc, study)
        for _ in range(300):
            if "REFUSED" in log.read_text():
                break
            time.sleep(0.1)
        node.terminate()
        node.wait(timeout=30)
        assert "REFUSED series" in log.read_text() and "the scan is CT but the model is for MR" in log.read_text()
        assert segs(orthanc, study) == []
    finally:
        orthanc.stop()
