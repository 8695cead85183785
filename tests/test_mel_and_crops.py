"""The mel contract, and the alignment of training crops."""

import itertools
import logging
from types import SimpleNamespace

import librosa
import numpy as np
import pytest
import torch

from models.vocoders.diffusion.diffusion_vocoder_dataset import CropDataset, EpochBatches, EpochBatchSampler, crop_pair
from processors.feature_store import feature_paths
from processors.mel import _mel_basis, mel_spectrogram
from utils import io

PRE = {"sample_rate": 24000, "n_fft": 1024, "hop_size": 256, "win_size": 1024, "n_mel": 100, "fmin": 0, "fmax": 12000}


@pytest.mark.parametrize("length", [385, 1000, 24000, 24000 + 255, 48123])
def test_frames_equal_length_over_hop(length):
    audio = np.random.default_rng(length).standard_normal(length).astype(np.float32) * 0.1
    assert mel_spectrogram(audio, PRE).shape == (100, length // 256)


@pytest.mark.parametrize(("rate", "n_fft", "n_mel", "fmin", "fmax"), [
    (24000, 1024, 100, 0.0, 12000), (22050, 1024, 80, 0.0, 8000), (44100, 2048, 128, 0.0, None),
    (16000, 512, 80, 55.0, 7600), (48000, 2048, 128, 40.0, 16000)])
def test_the_mel_filter_bank_is_librosas(rate, n_fft, n_mel, fmin, fmax):
    """Built here (librosa's import took 1.7 s of each process's start): Slaney's scale and norm, as librosa's default."""
    ours = _mel_basis(rate, n_fft, n_mel, fmin, fmax).numpy()
    reference = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mel, fmin=fmin, fmax=fmax)
    assert ours.shape == reference.shape and np.abs(ours - reference).max() < 1e-6 * np.abs(reference).max()


def test_empty_mel_filters_are_named_once(caplog):
    _mel_basis.cache_clear()
    with caplog.at_level(logging.WARNING, logger="processors.mel"):
        _mel_basis(8000, 64, 40, 0.0, None)
        _mel_basis(8000, 64, 40, 0.0, None)
    assert [r.getMessage() for r in caplog.records] == [
        "2 mel filters of 40 fall between the 33 FFT bins of n_fft 64 at 8000 Hz and stay at the log floor: use "
        "fewer mels or a larger n_fft"]


def test_mel_matches_an_independent_librosa_computation():
    audio = np.random.default_rng(0).standard_normal(24000 + 77).astype(np.float32) * 0.2
    ours = mel_spectrogram(audio, PRE).numpy()
    padded = np.pad(audio, (384, 384), mode="reflect")
    reference = librosa.feature.melspectrogram(
        y=padded, sr=24000, n_fft=1024, hop_length=256, win_length=1024, center=False, power=1.0,
        n_mels=100, fmin=0, fmax=12000, window="hann",
    )
    reference = np.log(np.maximum(reference, 1e-5))[:, : ours.shape[1]]
    assert ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 1e-4


def test_batched_mel_equals_single_and_floor_is_natural_log():
    audio = torch.zeros(2, 4096)
    audio[1] = torch.sin(torch.arange(4096) * 0.05)
    batch = mel_spectrogram(audio, PRE)
    assert torch.allclose(batch[1], mel_spectrogram(audio[1], PRE), atol=1e-5)
    assert torch.allclose(batch[0], torch.full_like(batch[0], float(np.log(1e-5))))


def test_too_short_audio_is_a_clear_error():
    with pytest.raises(ValueError, match="too short"):
        mel_spectrogram(np.zeros(100, np.float32), PRE)


def test_crop_mel_and_audio_cover_the_same_samples():
    rng = np.random.default_rng(1)
    audio = rng.standard_normal(256 * 100 + 50).astype(np.float32) * 0.1
    mel = mel_spectrogram(audio, PRE).numpy()
    for seed in range(5):
        mel_crop, audio_crop = crop_pair(mel, audio, 32, 256, np.random.default_rng(seed))
        assert mel_crop.shape == (100, 32) and audio_crop.shape == (32 * 256,)
        start = int(np.flatnonzero(np.all(np.isclose(mel, mel_crop[:, :1].numpy()), axis=0))[0])
        expected = audio[start * 256 : (start + 32) * 256]
        assert np.array_equal(audio_crop.numpy(), expected)
        # the crop's own mel, computed from the audio crop, agrees away from the edges
        inner = mel_spectrogram(audio_crop.numpy(), PRE).numpy()[:, 2:-2]
        assert np.abs(inner - mel_crop.numpy()[:, 2:-2]).max() < 1e-3


def test_short_items_are_zero_padded():
    audio = np.ones(256 * 10, np.float32) * 0.1
    mel = np.zeros((100, 10), np.float32)
    mel_crop, audio_crop = crop_pair(mel, audio, 32, 256, np.random.default_rng(0))
    assert torch.all(audio_crop[: 2560] == 0.1) and torch.all(audio_crop[2560:] == 0)
    assert torch.all(mel_crop[:, 10:] == np.float32(np.log(1e-5)))


def test_sampler_shards_without_overlap_and_resumes_mid_epoch():
    full = EpochBatchSampler(37, 4, seed=3)
    full.set_epoch(2)
    batches = list(full)
    resumed = EpochBatchSampler(37, 4, seed=3)
    resumed.set_epoch(2, skip_batches=3)
    assert list(resumed) == batches[3:]
    ranks = [EpochBatchSampler(37, 4, seed=3, rank=r, world=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    seen = [i for r in ranks for batch in r for i, _ in batch]
    assert len(seen) == len(set(seen)) and len(list(ranks[0])) == len(list(ranks[1]))


def test_an_endless_sampler_runs_on_into_the_next_epochs():
    """What training draws: from a resume point through the epochs that follow, each as a sampler of its own."""
    def epoch(number: int) -> list:
        one = EpochBatchSampler(37, 4, seed=3, rank=1, world=2)
        one.set_epoch(number)
        return list(one)

    endless = EpochBatchSampler(37, 4, seed=3, rank=1, world=2, endless=True)
    endless.set_epoch(2, skip_batches=3)
    assert len(endless) == len(epoch(2)) == 4  # 9 batches of 4, odd one left out, every other one
    drawn = list(itertools.islice(endless, 1 + 4 + 4))
    assert drawn == epoch(2)[3:] + epoch(3) + epoch(4)
    assert epoch(3) != epoch(4)  # a new order each epoch
    assert list(itertools.islice(EpochBatchSampler(0, 4, seed=3, endless=True), 5)) == []  # no items: no endless loop


def test_epoch_batches_keep_one_iterator_while_the_trainer_follows_it():
    sampler = EpochBatchSampler(20, 4, seed=1, endless=True)  # 5 batches per epoch
    passes = []

    class Loader:  # what EpochBatches needs of a DataLoader: a new pass over the sampler per iter()
        def __iter__(self):
            passes.append(1)
            return iter(sampler)

    def epoch(number: int, first: int = 0) -> list:
        one = EpochBatchSampler(20, 4, seed=1)
        one.set_epoch(number, first)
        return list(one)

    batches = EpochBatches(Loader(), sampler)
    assert list(batches.rest_of_epoch(0, 0)) == epoch(0)
    assert list(itertools.islice(batches.rest_of_epoch(1, 0), 2)) == epoch(1)[:2]  # a stop mid-epoch
    assert list(batches.rest_of_epoch(1, 2)) == epoch(1, 2) and len(passes) == 1  # followed on: the same pass
    assert list(itertools.islice(batches.rest_of_epoch(2, 0), 3)) == epoch(2)[:3]
    assert list(batches.rest_of_epoch(2, 1)) == epoch(2, 1) and len(passes) == 2  # behind the pass: a new one
    assert list(batches.rest_of_epoch(3, 7)) == [] and list(batches.rest_of_epoch(4, 0)) == epoch(4)  # past the end
    assert len(passes) == 3


def test_epoch_batches_start_a_new_pass_after_a_batch_that_failed_to_load():
    """The loader has used up a batch whose loading raised: a later call at that batch (a retry in the same
    process) must not follow the pass on, or it would get the batch after it as that one and skip a batch."""
    sampler = EpochBatchSampler(20, 4, seed=1, endless=True)  # 5 batches per epoch
    failed = []

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, key: tuple[int, int]) -> int:
            if key == sampler._all_batches(0)[2][0] and not failed:  # batch 2 of epoch 0 fails once
                failed.append(key)
                raise OSError("a read failed")
            return key[0]

    loader = torch.utils.data.DataLoader(Items(), batch_sampler=sampler, collate_fn=list)
    want = [[i for i, _ in batch] for batch in sampler._all_batches(0)]
    batches = EpochBatches(loader, sampler)
    with pytest.raises(OSError):
        list(batches.rest_of_epoch(0, 0))
    assert failed and list(batches.rest_of_epoch(0, 2)) == want[2:]


@pytest.mark.parametrize("map_above", [0, 1 << 40], ids=["mapped", "read-whole"])
def test_dataset_crops_from_mapped_files_equal_crops_of_loaded_arrays(tmp_path, monkeypatch, map_above):
    monkeypatch.setattr(io, "MAP_ABOVE_BYTES", map_above)
    rng = np.random.default_rng(2)
    audio = rng.standard_normal(256 * 300 + 17).astype(np.float32)
    mel = rng.standard_normal((100, 300)).astype(np.float32)
    entry = {"Dataset": "d", "Uid": "u"}
    mel_path, audio_path = feature_paths(tmp_path, entry)
    mel_path.parent.mkdir(parents=True)
    audio_path.parent.mkdir(parents=True)
    np.save(mel_path, mel)
    np.save(audio_path, audio)
    cfg = SimpleNamespace(preprocess=SimpleNamespace(processed_dir=str(tmp_path), hop_size=256, n_mel=100, cut_mel_frame=32))
    dataset = CropDataset(cfg, [entry])
    for seed in range(4):
        mel_crop, audio_crop = dataset[0, seed]
        expected = crop_pair(mel, audio, 32, 256, np.random.default_rng(seed))
        assert torch.equal(mel_crop, expected[0]) and torch.equal(audio_crop, expected[1])
        assert mel_crop.is_contiguous() and not isinstance(mel_crop.numpy(), np.memmap)
    assert isinstance(io.load_npy(audio_path, mmap=True), np.memmap) == (map_above == 0)


@pytest.mark.parametrize("bad", ["mel", "audio"])
def test_a_feature_file_of_the_wrong_rank_is_one_error_naming_it(tmp_path, bad):
    """A 1-D mel or a 2-D audio is refused naming the file (not an IndexError or a broadcast error from the crop)."""
    rng = np.random.default_rng(3)
    mel, audio = rng.standard_normal((100, 40)).astype(np.float32), rng.standard_normal(256 * 40).astype(np.float32)
    entry = {"Dataset": "d", "Uid": "u"}
    mel_path, audio_path = feature_paths(tmp_path, entry)
    mel_path.parent.mkdir(parents=True)
    audio_path.parent.mkdir(parents=True)
    np.save(mel_path, mel.reshape(-1) if bad == "mel" else mel)
    np.save(audio_path, audio.reshape(1, -1) if bad == "audio" else audio)
    cfg = SimpleNamespace(preprocess=SimpleNamespace(processed_dir=str(tmp_path), hop_size=256, n_mel=100, cut_mel_frame=32))
    with pytest.raises(ValueError, match=rf"^{mel_path if bad == 'mel' else audio_path}: .*shape"):
        CropDataset(cfg, [entry])[0, 0]


@pytest.mark.parametrize(("n_mel", "hop", "damage", "culprit", "words"), [
    (32, 256, None, "mel", "100 mel bands, but preprocess.n_mel is 32"),
    (100, 128, None, "mel", "40 frames for 10240 audio samples, but preprocess.hop_size 128 gives 80"),
    (100, 256, "mel", "mel", "NaN or inf"),
    (100, 256, "audio", "audio", "NaN or inf"),
], ids=["other-n_mel", "other-hop", "nan-mel", "inf-audio"])
def test_stale_or_non_finite_features_are_refused_naming_the_file(tmp_path, n_mel, hop, damage, culprit, words):
    """Features from other mel settings (config changed after stage 1) or holding NaN/inf never reach a step."""
    rng = np.random.default_rng(4)
    mel, audio = rng.standard_normal((100, 40)).astype(np.float32), rng.standard_normal(256 * 40).astype(np.float32)
    if damage == "mel":
        mel[3] = np.nan
    elif damage == "audio":
        audio[:] = np.inf
    entry = {"Dataset": "d", "Uid": "u"}
    paths = dict(zip(("mel", "audio"), feature_paths(tmp_path, entry), strict=True))
    for kind, array in (("mel", mel), ("audio", audio)):
        paths[kind].parent.mkdir(parents=True)
        np.save(paths[kind], array)
    cfg = SimpleNamespace(preprocess=SimpleNamespace(processed_dir=str(tmp_path), hop_size=hop, n_mel=n_mel,
                                                     cut_mel_frame=32))
    with pytest.raises(ValueError) as err:
        CropDataset(cfg, [entry])[0, 0]
    message = str(err.value)
    assert message.startswith(f"{paths[culprit]}: ") and words in message and "rerun stage 1" in message
    assert "\n" not in message
