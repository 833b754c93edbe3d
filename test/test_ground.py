"""The ground fit, its temporal filter and the canonical-camera rescaling: first on exact
synthetic depth (no model: the answer is known), then in the frame processor with real models
(the bundled one, also read as a relative checkpoint; the tiny one as a camera-aware one)."""

import dataclasses
import math

import numpy as np
import pytest

from metricgold_ros import messages
from metricgold_ros.camera import Calibration, Intrinsics
from metricgold_ros.canonical_camera import (ASSUMED_HFOV_DEG, canonical_scale, for_camera,
                                             processing_focal_px)
from metricgold_ros.depth_frame import DepthFrameProcessor, FrameOptions, frame_messages
from metricgold_ros.errors import InputError
from metricgold_ros.ground import (NO_CAMERA, NO_FLOOR, OFF, OK, POOR_FIT, Mounting,
                                   ScaleFilter, fit_ground, floor_depth_m, scale_depth)
from metricgold_ros.model import MetricGoldPipeline
from metricgold_ros.metric_scale import MetricScaler
from metricgold_ros.model_paths import bundled_model_path
from metricgold_ros.synthetic.camera import DEMO_MOUNTING
from metricgold_ros.synthetic.scenes import (CameraPose, camera_sequence, make_scene,
                                             render_sample, render_view)

WIDTH, HEIGHT = 96, 72


def mounting_of(sample, pitch_error_deg: float = 0.0) -> Mounting:
    return Mounting(sample.camera_height_m, sample.camera_pitch_deg + pitch_error_deg,
                    sample.camera_roll_deg)


def depth_or_nan(sample) -> np.ndarray:
    return np.where(sample.valid, sample.depth_m, np.nan).astype(np.float32)


@pytest.fixture(scope='module')
def street():
    """A street frame whose floor (road, 1.7 m below, 3 deg of roll) fills the lower image."""
    return render_sample(2_000_000, 'outdoor', WIDTH, HEIGHT)


@pytest.fixture(scope='module')
def room():
    return render_sample(2_000_001, 'indoor', WIDTH, HEIGHT)


@pytest.mark.parametrize('kind', ['indoor', 'outdoor'])
def test_floor_plane_from_the_mounting_is_the_rendered_floor(kind):
    """The generator's mounting (sign conventions, roll included) puts the plane on its floor."""
    for sample in list(camera_sequence(7, kind, 3, WIDTH, HEIGHT, fps=1.0)):
        floor = floor_depth_m(sample.intrinsics, mounting_of(sample))
        seen = np.isfinite(floor) & sample.valid & (np.abs(sample.depth_m / floor - 1) < 1e-3)
        assert seen.sum() > 0.05 * sample.depth_m.size
        # Nothing is seen behind the floor: every valid pixel is at most the floor's depth.
        behind = sample.valid & np.isfinite(floor) & (sample.depth_m > floor * 1.001)
        assert behind.sum() == 0


def test_pose_conventions_flip_to_the_mounting():
    """Positive pitch looks down and positive roll dips the right side (the pose's opposite)."""
    pose = CameraPose((0.0, 1.2, 0.0), pitch_rad=-math.radians(20), roll_rad=math.radians(5))
    height_m, pitch_deg, roll_deg = pose.mounting()
    assert (height_m, pitch_deg, roll_deg) == pytest.approx((1.2, 20.0, -5.0))
    down = np.array([0.0, -1.0, 0.0]) @ pose.axes()  # world down in camera coordinates
    assert Mounting(height_m, pitch_deg, roll_deg).down_vector() == pytest.approx(down)


@pytest.mark.parametrize('scale', [0.6, 1.7])
def test_metric_scale_recovered_exactly(street, room, scale):
    for sample in (street, room):
        truth = depth_or_nan(sample)
        fit = fit_ground(truth / scale, sample.intrinsics, mounting_of(sample), relative=False)
        assert fit.state == OK, fit.reason
        assert fit.floor_scale == pytest.approx(scale, rel=1e-3)
        assert fit.shift_m == 0.0
        assert np.nanmax(np.abs(scale_depth(truth / scale, fit.floor_scale) / truth - 1)) < 1e-3
        # Applied: the floor's scale weighted by the confidence (nearly 1 on exact depth).
        assert fit.confidence > 0.95
        assert fit.scale == pytest.approx(scale ** fit.confidence, rel=1e-3)


def test_relative_scale_and_shift_recovered_exactly(street, room):
    """Affine-invariant depth (min-max normalised, as a relative checkpoint gives) -> metres."""
    for sample in (street, room):
        truth = depth_or_nan(sample)
        low, high = np.nanmin(truth), np.nanmax(truth)
        relative = (truth - low) / (high - low)
        fit = fit_ground(relative, sample.intrinsics, mounting_of(sample), relative=True)
        assert fit.state == OK, fit.reason
        assert fit.scale == pytest.approx(high - low, rel=1e-3)
        assert fit.shift_m == pytest.approx(low, rel=1e-3)
        assert np.nanmax(np.abs(fit.apply(relative) / truth - 1)) < 1e-3


def with_objects(sample, share: float) -> np.ndarray:
    """The sample's depth with upright boxes standing on ``share`` of its floor pixels.

    Each box faces the camera: constant planar depth, that of the floor at its foot; they
    stand side by side along the image's columns from the left.
    """
    depth = depth_or_nan(sample)
    floor = floor_depth_m(sample.intrinsics, mounting_of(sample))
    on_floor = np.isfinite(floor) & (np.abs(depth / floor - 1) < 1e-3)
    target, covered, column = share * on_floor.sum(), 0, 0
    while covered < target and column < depth.shape[1]:
        rows = np.flatnonzero(on_floor[:, column])
        if rows.size:
            foot = rows.max()  # the lowest floor pixel of the column: the box stands there
            box_depth = floor[foot, column] * 0.999
            stop = column + 4
            depth[:foot + 1, column:stop] = np.minimum(depth[:foot + 1, column:stop], box_depth)
            covered += on_floor[:, column:stop].sum()
        column += 4
    return depth


@pytest.mark.parametrize('relative', [False, True])
def test_objects_covering_half_the_floor(street, relative):
    truth = depth_or_nan(street)
    depth = with_objects(street, 0.5)
    floor = floor_depth_m(street.intrinsics, mounting_of(street))
    seen_before = (np.abs(truth / floor - 1) < 1e-3).sum()
    seen_after = (np.abs(depth / floor - 1) < 1e-3).sum()
    assert 0.45 < 1 - seen_after / seen_before < 0.6  # half of the floor is hidden
    if relative:
        low, high = np.nanmin(depth), np.nanmax(depth)
        depth = (depth - low) / (high - low)
        expected = (high - low, low)
    else:
        depth = depth / 1.4
        expected = (1.4, 0.0)
    fit = fit_ground(depth, street.intrinsics, mounting_of(street), relative=relative)
    assert fit.state == OK, fit.reason
    assert 0.3 < fit.inlier_share < 0.85  # boxes stay inliers near their foot
    assert (fit.floor_scale, fit.shift_m) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert np.nanmedian(np.abs(scale_depth(depth, fit.floor_scale, fit.shift_m) /
                               with_objects(street, 0.5) - 1)) < 1e-3
    if relative:  # no scale of its own: the floor's is applied whole
        assert fit.scale == fit.floor_scale
    else:  # half the floor agrees: the model's own scale keeps its share of the weight
        assert fit.confidence < 0.85
        assert fit.scale == pytest.approx(1.4 ** fit.confidence, rel=1e-3)


def test_wrong_pitch_by_two_degrees(street, room, record_property):
    """A pitch 2 degrees off biases the scale; the error is recorded (about 10-20 % here)."""
    errors = {}
    for name, sample in (('street', street), ('room', room)):
        truth = depth_or_nan(sample)
        for sign in (-1, 1):
            fit = fit_ground(truth, sample.intrinsics, mounting_of(sample, 2.0 * sign),
                             relative=False)
            assert fit.state == OK, fit.reason
            errors[f'{name} pitch {2 * sign:+d} deg'] = round(fit.scale - 1.0, 4)
    record_property('scale_error_of_2deg_pitch', errors)
    print('scale error from a pitch error of 2 deg:', errors)
    assert all(0.01 < abs(error) < 0.3 for error in errors.values()), errors
    # Looking down more than configured puts the plane farther: the scale grows.
    assert errors['street pitch -2 deg'] > 0 > errors['street pitch +2 deg']


def test_no_fit_looking_at_the_sky():
    scene = make_scene(2_000_002, 'outdoor')
    intrinsics = (60.0, 60.0, (WIDTH - 1) / 2, (HEIGHT - 1) / 2)
    sample = render_view(scene, CameraPose((0.0, 1.5, 5.0), pitch_rad=math.radians(45)),
                         intrinsics, WIDTH, HEIGHT)
    assert sample.camera_pitch_deg == pytest.approx(-45.0)
    for relative in (False, True):
        fit = fit_ground(depth_or_nan(sample), sample.intrinsics, mounting_of(sample),
                         relative=relative)
        assert fit.state == NO_FLOOR
        assert fit.scale == 1.0 and fit.shift_m == 0.0
        assert 'not in view' in fit.reason


def test_no_fit_facing_a_wall():
    """A wall 2 m ahead hides the floor: no scale, though the floor's rays are in view."""
    camera = Intrinsics(70.0, 70.0, (WIDTH - 1) / 2, (HEIGHT - 1) / 2, WIDTH, HEIGHT)
    mounting = Mounting(1.5, 10.0, 0.0)
    rows = (np.arange(HEIGHT) - camera.cy_px) / camera.fy_px
    pitch = math.radians(mounting.pitch_deg)
    # Planar depth of a vertical wall 2 m ahead (horizontal distance) for each row.
    wall = 2.0 / (math.cos(pitch) - rows * math.sin(pitch))
    depth = np.repeat(wall[:, None], WIDTH, axis=1).astype(np.float32)
    floor = floor_depth_m(camera, mounting)
    assert np.isfinite(floor).mean() > 0.3  # the floor's rays are there, the wall hides them
    for relative, scale in ((False, 1.0), (False, 0.7), (True, 0.1)):
        fit = fit_ground(depth * scale, camera, mounting, relative=relative)
        assert fit.state == POOR_FIT, (relative, scale, fit)
        assert fit.scale == 1.0 and fit.shift_m == 0.0
        assert fit.reason


def test_states_without_mounting_or_camera(street):
    depth = depth_or_nan(street)
    assert fit_ground(depth, street.intrinsics, Mounting(), relative=False).state == OFF
    fit = fit_ground(depth, None, mounting_of(street), relative=False)
    assert fit.state == NO_CAMERA and 'camera_info' in fit.reason
    with pytest.raises(InputError, match='intrinsics are for'):
        fit_ground(depth[:, :-1], street.intrinsics, mounting_of(street), relative=False)


@pytest.mark.parametrize('kwargs, match', [
    ({'height_m': -1.0}, 'camera_height_m=-1.0'),
    ({'height_m': 1.0, 'pitch_deg': 95.0}, 'camera_pitch_deg=95.0'),
    ({'height_m': 1.0, 'roll_deg': float('nan')}, 'camera_roll_deg=nan'),
])
def test_mounting_refuses_impossible_values(kwargs, match):
    with pytest.raises(InputError, match=match):
        Mounting(**kwargs)


def test_filter_rejects_an_outlier():
    scale_filter = ScaleFilter()
    for _ in range(5):
        assert scale_filter.update(1.0).scale == pytest.approx(1.0)
    step = scale_filter.update(2.0)  # one frame off by 2x: rejected
    assert step.event == 'outlier' and step.scale == pytest.approx(1.0)
    assert scale_filter.update(1.02).event == 'track'
    assert scale_filter.scale == pytest.approx(1.02 ** 0.3, rel=1e-6)


@pytest.mark.parametrize('confirm_frames', [2, 3])  # 3: the default
def test_filter_follows_a_real_step_without_lag(confirm_frames):
    scale_filter = ScaleFilter(confirm_frames=confirm_frames)
    for _ in range(5):
        scale_filter.update(1.0)
    for _ in range(confirm_frames - 1):  # could be outliers...
        step = scale_filter.update(1.6)
        assert step.event == 'outlier' and step.scale == pytest.approx(1.0)
    step = scale_filter.update(1.6)  # ...confirm_frames agreeing frames: the scene changed
    assert step.event == 'jump' and step.scale == pytest.approx(1.6)
    assert scale_filter.update(1.6).scale == pytest.approx(1.6)  # no exponential tail


@pytest.mark.parametrize('kwargs, match', [({'smoothing': 0.0}, 'smoothing=0.0'),
                                            ({'gate_log': -1.0}, 'gate_log=-1.0'),
                                            ({'confirm_frames': 0}, 'confirm_frames=0')])
def test_filter_refuses_bad_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        ScaleFilter(**kwargs)


def test_filter_smooths_jitter():
    rng = np.random.default_rng(0)
    raw = np.exp(0.05 * rng.standard_normal(200))
    scale_filter = ScaleFilter()
    filtered = np.log([scale_filter.update(float(s)).scale for s in raw])
    assert np.std(np.diff(filtered)) < 0.5 * np.std(np.diff(np.log(raw)))
    scale_filter.reset()
    assert scale_filter.scale is None


# Camera-aware checkpoints (canonical focal length) ---------------------------------------


class CameraAware:
    """Metadata of a camera-aware checkpoint (only the field the rescaling reads)."""

    canonical_focal_px = 100.0


def test_processing_focal_follows_the_processed_size():
    camera = Intrinsics(500.0, 510.0, 319.5, 239.5, 640, 480)
    assert processing_focal_px(camera, 640, 480, 0) == (505.0, False)
    assert processing_focal_px(camera, 640, 480, 320)[0] == pytest.approx(252.5)
    # CameraInfo of the full frame, image downscaled by the driver: the same processed focal.
    assert processing_focal_px(camera, 320, 240, 320)[0] == pytest.approx(252.5)
    focal, assumed = processing_focal_px(None, 640, 480, 128)
    assert assumed and focal == pytest.approx(64 / math.tan(math.radians(ASSUMED_HFOV_DEG / 2)))
    assert canonical_scale(CameraAware(), 250.0) == 2.5
    assert canonical_scale(object(), 250.0) == 1.0  # no field: exactly as before


def test_offline_scoring_rescales_as_the_node_does():
    """`for_camera` (evaluation, validation, benches) applies the node's factor f / f_c."""
    camera = Intrinsics(500.0, 510.0, 319.5, 239.5, 640, 480)
    depth = np.full((480, 640), 2.0, np.float32)
    scored = for_camera(depth, CameraAware(), camera, 128)
    published, _, report = MetricScaler().correct(
        depth, None, relative=False, camera=camera, image_size=(640, 480),
        processing_resolution=128, metadata=CameraAware(), mounting=Mounting())
    assert report.canonical_factor == pytest.approx(1.01)  # f = (100 + 102) / 2 at 128x96
    np.testing.assert_allclose(scored, published)
    assert for_camera(depth, object(), None, 128) is depth  # not camera-aware: untouched
    with pytest.raises(InputError, match='intrinsics'):
        for_camera(depth, CameraAware(), None, 128)


def test_two_fields_of_view_give_the_same_metric_depth():
    """A canonical-camera model's output (depth as if seen with f_c) rescaled per camera."""
    scene = make_scene(2_000_003, 'indoor')
    pose = CameraPose((scene.path[1], 1.4, scene.path[2]), pitch_rad=-0.2)
    depths = []
    for hfov_deg in (50.0, 85.0):
        focal = WIDTH / 2 / math.tan(math.radians(hfov_deg) / 2)
        sample = render_view(scene, pose, (focal, focal, (WIDTH - 1) / 2, (HEIGHT - 1) / 2),
                             WIDTH, HEIGHT)
        focal_px, _ = processing_focal_px(sample.intrinsics, WIDTH, HEIGHT, 48)
        canonical_prediction = sample.depth_m * CameraAware.canonical_focal_px / focal_px
        assert not np.allclose(canonical_prediction, sample.depth_m)
        depths.append(canonical_prediction * canonical_scale(CameraAware(), focal_px))
        assert np.allclose(depths[-1], sample.depth_m, rtol=1e-5)
    # The optical axis sees the same point in both: the same metric depth.
    centre = (HEIGHT // 2, WIDTH // 2)
    assert depths[0][centre] == pytest.approx(depths[1][centre], rel=0.02)


# In the frame processor (node, bag tool and infer share it) ------------------------------


def calibration_of(sample) -> Calibration:
    return Calibration(sample.intrinsics)


def mounting_options(sample) -> FrameOptions:
    return FrameOptions(camera_height_m=sample.camera_height_m,
                        camera_pitch_deg=sample.camera_pitch_deg,
                        camera_roll_deg=sample.camera_roll_deg)


@pytest.fixture(scope='module')
def bundled():
    """The bundled (trained) model: its depth follows the scene, so the floor can be found."""
    return MetricGoldPipeline.from_pretrained(bundled_model_path(), device='cpu',
                                              dtype='float32')


@pytest.fixture
def relative_pipeline(bundled):
    """The bundled model read as a relative checkpoint (log depth in [0, 1]: not metres)."""
    metric = bundled.metadata
    bundled.metadata = dataclasses.replace(metric, relative=True)
    yield bundled
    bundled.metadata = metric


def sky_view():
    """A street seen looking 40 degrees up: no floor in view."""
    return render_view(make_scene(2_000_002, 'outdoor'), CameraPose(
        (0.0, 1.5, 5.0), pitch_rad=math.radians(40)), (60.0, 60.0, 47.5, 35.5), WIDTH, HEIGHT)


def test_relative_checkpoint_becomes_metric_where_the_floor_is_found(relative_pipeline):
    street = render_sample(2_000_000, 'outdoor', WIDTH, HEIGHT)
    processor = DepthFrameProcessor(relative_pipeline)
    plain = processor.process(street.rgb, calibration_of(street), FrameOptions())
    assert plain.relative and plain.cloud is None and plain.scale.metric is False
    assert np.nanmax(plain.depth) <= 1.0
    assert 'depth/scale' not in frame_messages(messages.rosbags_types(), street_header(),
                                               plain)
    fitted = processor.process(street.rgb, calibration_of(street), mounting_options(street))
    assert fitted.scale.fit.state == OK and not fitted.relative
    assert fitted.cloud is not None  # metres, so points
    valid = street.valid & np.isfinite(fitted.depth)
    abs_rel = np.mean(np.abs(fitted.depth[valid] / street.depth_m[valid] - 1))
    assert abs_rel < 0.35, abs_rel  # metres now (relative values would be off by ~10x)
    out = frame_messages(messages.rosbags_types(), street_header(), fitted)
    status = out['depth/scale'].status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert status.level == 0 and values['state'] == 'ok' and values['metric'] == 'true'
    assert float(values['scale']) == pytest.approx(fitted.scale.scale, rel=1e-5)
    assert 0.25 <= float(values['inlier_share']) <= 1.0


def test_relative_checkpoint_without_a_fit_publishes_no_metric_outputs(relative_pipeline):
    sky = sky_view()
    result = DepthFrameProcessor(relative_pipeline).process(
        sky.rgb, calibration_of(sky), mounting_options(sky))
    assert result.scale.fit.state == NO_FLOOR and result.relative and result.cloud is None
    out = frame_messages(messages.rosbags_types(), street_header(), result)
    assert 'points' not in out
    status = out['depth/scale'].status[0]
    assert status.level == 1 and 'no points' in status.message


def test_metric_checkpoint_scaled_by_the_filtered_fit_or_kept(bundled):
    processor, plain = DepthFrameProcessor(bundled), DepthFrameProcessor(bundled)
    height_m, pitch_deg = DEMO_MOUNTING  # the nominal mounting, as a robot is configured
    mounted = FrameOptions(camera_height_m=height_m, camera_pitch_deg=pitch_deg)
    events = []
    for sample in camera_sequence(2, 'outdoor', 2, WIDTH, HEIGHT, 10.0, DEMO_MOUNTING):
        own = plain.process(sample.rgb, calibration_of(sample), FrameOptions())
        fitted = processor.process(sample.rgb, calibration_of(sample), mounted)
        assert fitted.scale.fit.state == OK
        events.append(fitted.scale.filter_event)
        np.testing.assert_allclose(fitted.depth, own.depth * fitted.scale.scale, rtol=1e-5)
        assert not fitted.scale.fit.scale == pytest.approx(1.0, abs=1e-3)
    assert events == ['start', 'track']
    sky = sky_view()
    own = plain.process(sky.rgb, calibration_of(sky), FrameOptions())
    kept = processor.process(sky.rgb, calibration_of(sky), mounting_options(sky))
    assert kept.scale.fit.state == NO_FLOOR and kept.scale.scale == 1.0
    assert np.array_equal(kept.depth, own.depth) and kept.cloud is not None


def street_header():
    types = messages.rosbags_types()
    return types.Header(stamp=types.Time(sec=1, nanosec=0), frame_id='camera_optical')


@pytest.fixture(scope='module')
def camera_aware(tiny_model_dir):
    """The tiny model as a camera-aware checkpoint (canonical focal 100 px)."""
    pipeline = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', dtype='float32')
    pipeline.metadata = dataclasses.replace(pipeline.metadata, canonical_focal_px=100.0)
    return pipeline


@pytest.mark.parametrize('output_scale, resolution', [(1.0, 64), (0.5, 64), (1.0, 32)])
def test_camera_aware_depth_follows_the_processing_resolution(
        tiny_pipeline, camera_aware, output_scale, resolution):
    """Depth x f / f_c, f at the processing resolution: output_scale does not change it."""
    rgb = render_sample(5, 'indoor', WIDTH, HEIGHT).rgb
    camera = Intrinsics(80.0, 80.0, 47.5, 35.5, WIDTH, HEIGHT)
    options = FrameOptions(output_scale=output_scale, processing_resolution=resolution)
    plain = DepthFrameProcessor(tiny_pipeline).process(rgb, Calibration(camera), options)
    aware = DepthFrameProcessor(camera_aware).process(rgb, Calibration(camera), options)
    focal_px = 80.0 * resolution / WIDTH  # the networks saw a `resolution`-wide image
    assert aware.scale.focal_px == pytest.approx(focal_px)
    assert aware.scale.canonical_factor == pytest.approx(focal_px / 100.0)
    np.testing.assert_allclose(aware.depth, plain.depth * focal_px / 100.0, rtol=1e-5)
    assert plain.scale.focal_px is None and plain.scale.canonical_factor == 1.0
    assert not plain.scale.active and aware.scale.active


def test_camera_aware_without_intrinsics_assumes_a_field_of_view_once(camera_aware):
    rgb = render_sample(5, 'indoor', WIDTH, HEIGHT).rgb
    processor = DepthFrameProcessor(camera_aware)
    first = processor.process(rgb, None, FrameOptions(processing_resolution=64))
    second = processor.process(rgb, None, FrameOptions(processing_resolution=64))
    assert first.scale.focal_assumed
    assert first.scale.focal_px == pytest.approx(32 / math.tan(math.radians(ASSUMED_HFOV_DEG)
                                                                / 2))
    assert len(first.scale.notes) == 1 and 'field of view' in first.scale.notes[0]
    assert second.scale.notes == ()
