"""Labels back onto the scan: largest components are kept on the network's grid, and the result is
the one keeping them on the scan's finer grid gives."""

import numpy as np
import SimpleITK as sitk

from imunet.runtime.imaging.postprocess import keep_largest
from imunet.runtime.imaging.prepare import Prepared, restore
from imunet.runtime.imaging.preprocess import resample_label_like


def test_largest_components_on_the_network_grid_equal_those_on_the_scan_grid():
    coarse = np.zeros((20, 16, 16), np.uint8)
    coarse[4:12, 3:9, 3:10] = 1  # the organ
    coarse[15:17, 12:14, 12:13] = 1  # a stray island
    coarse[13, 10, 10] = 1  # another, touching nothing
    coarse[3:6, 11:15, 2:5] = 2  # a second label, in two pieces touching at a corner only
    coarse[6, 15, 5] = 2
    labels = sitk.GetImageFromArray(coarse)
    labels.SetSpacing((3.9, 3.9, 2.5))
    labels.SetOrigin((-30.0, -30.0, -25.0))
    scan = sitk.Image(62, 62, 20, sitk.sitkInt16)  # a planning CT's finer in-plane grid over the same extent
    scan.SetSpacing((0.977, 0.977, 2.5))
    scan.SetOrigin((-31.4, -31.4, -25.0))
    prepared = Prepared(oriented=scan, resampled=labels, volume=coarse.astype(np.float32))
    out = sitk.GetArrayFromImage(restore(labels, prepared, scan, (1, 2)))
    fine_first = sitk.GetArrayFromImage(keep_largest(resample_label_like(labels, scan), (1, 2)))
    np.testing.assert_array_equal(out, fine_first)
    assert out.shape == (20, 62, 62)
    assert (out == 2).sum() == (sitk.GetArrayFromImage(resample_label_like(labels, scan)) == 2).sum()  # one component
    organ = sitk.GetImageFromArray((coarse == 1).astype(np.uint8))
    organ.CopyInformation(labels)
    assert 0 < (out == 1).sum() < sitk.GetArrayFromImage(resample_label_like(organ, scan)).sum()  # islands went
