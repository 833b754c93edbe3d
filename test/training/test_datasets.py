"""Training loaders on tiny fake folders in the real layouts, the VKITTI2 round trip, mixing."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from torch.utils.data import DataLoader

from metricgold_ros.errors import InputError
from metricgold_ros.synthetic.scenes import render_sample
from metricgold_ros.synthetic.vkitti import write_vkitti2
from training.datasets import (DatasetError, HypersimDataset, MixedBatchSampler,
                               TartanAirDataset, VirtualKitti2Dataset, build_mixed_dataset,
                               hypersim_distance_to_planar)

W, H = 32, 24


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1])


def _write_png16(path: Path, raw: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), raw.astype(np.uint16))


def test_hypersim_marigold_layout_with_and_without_list(tmp_path):
    split = tmp_path / 'train'
    depth_mm = np.full((H, W), 2500, np.uint16)
    depth_mm[0, :5] = 0  # Marigold writes 0 where Hypersim has no geometry
    for frame in range(2):
        _write_rgb(split / 'ai_001_001' / f'rgb_cam_00_fr{frame:04d}.png', _rgb(frame))
        _write_png16(split / 'ai_001_001' / f'depth_plane_cam_00_fr{frame:04d}.png', depth_mm)
    listing = tmp_path / 'filename_list_train.txt'
    listing.write_text('ai_001_001/rgb_cam_00_fr0001.png ai_001_001/depth_plane_cam_00_fr0001.png'
                       '\n')
    assert len(HypersimDataset(split)) == 2
    item = HypersimDataset(split, split_file=listing)[0]
    assert item['name'] == 'ai_001_001/rgb_cam_00_fr0001' and item['domain'] == 'indoor'
    assert item['rgb'].dtype == np.uint8 and (item['rgb'] == _rgb(1)).all()  # PNG is lossless
    assert item['depth_m'].dtype == np.float32 and item['depth_m'][5, 5] == pytest.approx(2.5)
    assert not item['valid'][0, :5].any() and item['valid'][1:].all()
    assert (item['depth_m'][~item['valid']] == 0).all()
    fx, fy, cx, cy = item['intrinsics']  # Hypersim's 1024x768 camera scaled to 32x24
    assert (fx, fy) == pytest.approx((886.81 / 32, 886.81 / 32)) and (cx, cy) == (15.5, 11.5)


def test_hypersim_errors_name_the_folder_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match='no frames found under .*depth_plane_cam_XX'):
        HypersimDataset(tmp_path)
    _write_rgb(tmp_path / 'ai_001_001' / 'rgb_cam_00_fr0000.png', _rgb(0))
    with pytest.raises(DatasetError, match='1 file.*missing.*depth_plane_cam_00_fr0000.png'):
        HypersimDataset(tmp_path)
    listing = tmp_path / 'list.txt'
    listing.write_text('only_one_path.png\n')
    with pytest.raises(DatasetError, match='line 1'):
        HypersimDataset(tmp_path, listing)


def test_hypersim_distance_to_planar_matches_a_hand_computed_pixel():
    distance = np.full((768, 1024), 10.0)
    depth = hypersim_distance_to_planar(distance)
    # Pixel (u=0, v=0): sqrt(511.5^2 + 383.5^2 + 886.81^2) = sqrt(1195136.4761) = 1093.22298,
    # so z = 10 * 886.81 / 1093.22298 = 8.111886 m.
    assert depth[0, 0] == pytest.approx(8.111886, abs=1e-5)
    assert depth[383, 511] == pytest.approx(10.0, abs=1e-5)  # 0.5 px from the centre
    assert depth.dtype == np.float32
    with pytest.raises(InputError, match='shape'):
        hypersim_distance_to_planar(np.ones((4, 4)))


def test_hypersim_raw_distance_npy_is_converted(tmp_path):
    split = tmp_path / 'raw'
    _write_rgb(split / 'scene' / 'rgb_cam_00_fr0000.png', _rgb(0))
    distance = np.full((H, W), 4.0)
    distance[0, 0] = np.nan
    np.save(split / 'scene' / 'dist.npy', distance)
    listing = tmp_path / 'list.txt'
    listing.write_text('scene/rgb_cam_00_fr0000.png scene/dist.npy\n')
    item = HypersimDataset(split, listing)[0]
    f = 886.81 / 32
    assert item['depth_m'][5, 7] == pytest.approx(4 * f / np.sqrt(8.5 ** 2 + 6.5 ** 2 + f ** 2))
    assert not item['valid'][0, 0] and item['valid'].sum() == W * H - 1


def _vkitti2_frame(root: Path, scene: str, frame: int, depth_cm: np.ndarray) -> None:
    base = root / scene / 'clone' / 'frames'
    _write_rgb(base / 'rgb' / 'Camera_0' / f'rgb_{frame:05d}.jpg', _rgb(frame))
    _write_png16(base / 'depth' / 'Camera_0' / f'depth_{frame:05d}.png', depth_cm)


def test_vkitti2_depth_sky_and_per_frame_intrinsics(tmp_path):
    depth_cm = np.full((H, W), 1234, np.uint16)
    depth_cm[:3] = 65535  # sky
    depth_cm[3, 0] = 0
    for frame in range(2):
        _vkitti2_frame(tmp_path, 'Scene06', frame, depth_cm)
    (tmp_path / 'Scene06' / 'clone' / 'intrinsic.txt').write_text(
        'frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]\n0 0 725.0087 725.0087 620.5 187\n'
        '0 1 725.0087 725.0087 620.5 187\n1 0 30.5 31.25 15.5 11.75\n1 1 1 1 1 1\n')
    data = VirtualKitti2Dataset(tmp_path)
    item = data[1]
    assert item['intrinsics'] == (30.5, 31.25, 15.5, 11.75)
    assert data[0]['intrinsics'] == (725.0087, 725.0087, 620.5, 187.0)
    assert item['depth_m'][10, 10] == pytest.approx(12.34) and item['domain'] == 'outdoor'
    assert not item['valid'][:3].any() and not item['valid'][3, 0] and item['valid'][4:].all()
    assert (item['depth_m'][:3] == 0).all()
    assert item['name'] == 'Scene06/clone/Camera_0/00001'
    assert np.abs(item['rgb'].astype(int) - _rgb(1)).mean() < 60  # JPEG, lossy


def test_vkitti2_split_archives_and_missing_files(tmp_path):
    depth_cm = np.full((H, W), 500, np.uint16)
    _vkitti2_frame(tmp_path / 'vkitti_2.0.3_rgb', 'Scene01', 0, depth_cm)
    (tmp_path / 'vkitti_2.0.3_rgb' / 'Scene01' / 'clone' / 'frames' / 'depth').rename(
        tmp_path / 'moved')
    textgt = tmp_path / 'vkitti_2.0.3_textgt' / 'Scene01' / 'clone'
    textgt.mkdir(parents=True)
    (textgt / 'intrinsic.txt').write_text('frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]\n'
                                          '0 0 20 20 15.5 11.5\n')
    with pytest.raises(DatasetError, match='depth_00000.png is missing.*expected'):
        VirtualKitti2Dataset(tmp_path)
    target = tmp_path / 'vkitti_2.0.3_depth' / 'Scene01' / 'clone' / 'frames' / 'depth'
    target.parent.mkdir(parents=True)
    (tmp_path / 'moved').rename(target)
    item = VirtualKitti2Dataset(tmp_path)[0]
    assert item['intrinsics'] == (20.0, 20.0, 15.5, 11.5) and item['depth_m'][0, 0] == 5.0
    with pytest.raises(DatasetError, match='no frames found under .*SceneXX'):
        VirtualKitti2Dataset(tmp_path, cameras=('Camera_1',))
    with pytest.raises(DatasetError, match='does not exist'):
        VirtualKitti2Dataset(tmp_path / 'nowhere')


def test_vkitti2_reads_both_cameras_and_selects_scenes(tmp_path):
    """Marigold trains on Camera_0 and Camera_1 and holds Scene01 out (issue 13)."""
    depth_cm = np.full((H, W), 700, np.uint16)
    rows = ['frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]', '0 0 20 20 15.5 11.5',
            '0 1 21 21 15.5 11.5']
    for scene in ('Scene01', 'Scene02'):
        base = tmp_path / scene / 'clone'
        for camera in ('Camera_0', 'Camera_1'):
            _write_rgb(base / 'frames' / 'rgb' / camera / 'rgb_00000.jpg', _rgb(0))
            _write_png16(base / 'frames' / 'depth' / camera / 'depth_00000.png', depth_cm)
        (base / 'intrinsic.txt').write_text('\n'.join(rows) + '\n')
    names = [item.name for item in VirtualKitti2Dataset(tmp_path).items]
    assert names == [f'{scene}/clone/{camera}/00000' for scene in ('Scene01', 'Scene02')
                     for camera in ('Camera_0', 'Camera_1')]
    train = VirtualKitti2Dataset(tmp_path, scenes=['Scene02'])
    assert [item.name for item in train.items] == names[2:]
    assert [train[i]['intrinsics'][0] for i in range(2)] == [20.0, 21.0]
    assert len(VirtualKitti2Dataset(tmp_path, cameras=['Camera_0'], scenes=['Scene01'])) == 1


def test_synthetic_writer_round_trips_through_the_vkitti2_loader(tmp_path):
    assert write_vkitti2(tmp_path, 2, seed=11, width=48, height=36) == 4
    data = VirtualKitti2Dataset(tmp_path)
    assert len(data) == 4
    for index in range(4):
        item = data[index]
        kind = 'indoor' if item['name'].startswith('Scene01') else 'outdoor'
        assert item['domain'] == kind
        truth = render_sample(11 + int(item['name'][-1]), kind, 48, 36)
        assert item['intrinsics'] == (truth.fx_px, truth.fy_px, truth.cx_px, truth.cy_px)
        assert (item['valid'] == truth.valid).all()
        assert np.abs(item['depth_m'] - truth.depth_m)[truth.valid].max() <= 0.005 + 1e-6
        assert np.abs(item['rgb'].astype(int) - truth.rgb).mean() < 8  # JPEG quality 95
    with pytest.raises(InputError, match='exists'):
        write_vkitti2(tmp_path, 1, width=48, height=36)


def test_tartanair_layout_domains_and_sky(tmp_path):
    for env in ('hospital', 'gascola'):
        traj = tmp_path / env / 'Easy' / 'P001'
        _write_rgb(traj / 'image_left' / '000000_left.png', _rgb(0))
        depth = np.full((H, W), 7.5, np.float32)
        depth[0] = 12000.0  # sky is very far
        (traj / 'depth_left').mkdir()
        np.save(traj / 'depth_left' / '000000_left_depth.npy', depth)
    data = TartanAirDataset(tmp_path)
    assert [item['domain'] for item in data] == ['outdoor', 'indoor']  # gascola, hospital
    item = data[1]
    assert item['name'] == 'hospital/Easy/P001/image_left/000000_left'
    assert not item['valid'][0].any() and item['valid'][1:].all()
    assert item['depth_m'][5, 5] == 7.5
    # 640x480 -> 32x24 px, pixel centres kept: cx = (320 + 0.5) * 0.05 - 0.5
    assert item['intrinsics'] == pytest.approx((16.0, 16.0, 15.525, 11.525))
    assert TartanAirDataset(tmp_path / 'gascola', domain='indoor')[0]['domain'] == 'indoor'
    assert [d['domain'] for d in TartanAirDataset(tmp_path, {'hospital': 'outdoor'})] == [
        'outdoor', 'outdoor']
    (tmp_path / 'gascola' / 'Easy' / 'P001' / 'depth_left' / '000000_left_depth.npy').unlink()
    with pytest.raises(DatasetError, match='missing.*depth_left'):
        TartanAirDataset(tmp_path)


def test_mixed_batches_follow_probabilities_one_dataset_each():
    sampler = MixedBatchSampler([100, 50, 30], [5, 3, 2], batch_size=4, seed=1,
                                num_batches=3000)
    batches = list(sampler)
    bounds = [(0, 100), (100, 150), (150, 180)]
    source = []
    for batch in batches:
        which = [i for i, (lo, hi) in enumerate(bounds) if lo <= batch[0] < hi][0]
        assert all(bounds[which][0] <= i < bounds[which][1] for i in batch)
        assert len(set(batch)) == 4
        source.append(which)
    freq = np.bincount(source, minlength=3) / len(source)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)
    items = np.concatenate(batches)
    assert len(np.unique(items[items < 100])) == 100  # every item of dataset 0 gets drawn


def test_mixed_batches_are_deterministic_and_resumable():
    full = list(MixedBatchSampler([10, 3], [1, 1], 4, seed=7, num_batches=20))
    assert full == list(MixedBatchSampler([10, 3], [1, 1], 4, seed=7, num_batches=20))
    assert full != list(MixedBatchSampler([10, 3], [1, 1], 4, seed=8, num_batches=20))
    assert any(len(set(b)) < 4 for b in full)  # 3 items, batch of 4: repeats allowed there
    sampler = MixedBatchSampler([10, 3], [1, 1], 4, seed=7, num_batches=20)
    stream = iter(sampler)
    head = [next(stream) for _ in range(8)]
    state = sampler.state_dict()
    assert state == {'seed': 7, 'position': 8}
    resumed = MixedBatchSampler([10, 3], [1, 1], 4, num_batches=20)
    resumed.load_state_dict(state)
    assert len(resumed) == 12 and head + list(resumed) == full
    with pytest.raises(DatasetError, match='probabilities'):
        MixedBatchSampler([10, 3], [1], 4)
    with pytest.raises(DatasetError, match='empty'):
        MixedBatchSampler([10, 0], [1, 1], 4)


def test_build_mixed_dataset_feeds_a_dataloader(tmp_path):
    write_vkitti2(tmp_path / 'synthetic', 2, seed=0, width=W, height=H)
    for frame in range(3):
        traj = tmp_path / 'tartan' / 'office' / 'Hard' / 'P000'
        _write_rgb(traj / 'image_left' / f'{frame:06d}_left.png', _rgb(frame))
        (traj / 'depth_left').mkdir(exist_ok=True)
        np.save(traj / 'depth_left' / f'{frame:06d}_left_depth.npy', np.ones((H, W), np.float32))
    datasets = [VirtualKitti2Dataset(tmp_path / 'synthetic'),
                TartanAirDataset(tmp_path / 'tartan')]
    concat, sampler = build_mixed_dataset(datasets, [0.5, 0.5], 2, seed=3, num_batches=6)
    loader = DataLoader(concat, batch_sampler=sampler, collate_fn=list)
    batches = list(loader)
    assert len(batches) == 6 and all(len(b) == 2 for b in batches)
    for batch in batches:
        assert len({item['name'].startswith('Scene') for item in batch}) == 1  # one dataset
        assert len({item['rgb'].shape for item in batch}) == 1
    with pytest.raises(DatasetError, match='no frames found'):
        TartanAirDataset(tmp_path / 'synthetic')
