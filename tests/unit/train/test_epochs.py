"""The trainer's batches across epochs: the same batches in the same order as one loader per epoch
built when the previous one ends, with the next loader started while the last prepared batches of
the current one are handed over."""

import itertools

from modsquad_ds.train.epochs import epoch_batches


class FakeLoader:
    def __init__(self, epoch, start, per_epoch, in_flight, log):
        self.epoch, self.start_batch, self.per_epoch, self.in_flight, self.log = epoch, start, per_epoch, in_flight, log
        self.started = False
        log.append(("build", epoch))

    def __len__(self):
        return self.per_epoch - self.start_batch

    def start(self):
        self.started = True
        self.log.append(("start", self.epoch))
        return self

    def __iter__(self):
        for b in range(self.start_batch, self.per_epoch):
            self.log.append(("take", self.epoch, b))
            yield (self.epoch, b)


def _run(per_epoch, in_flight, epoch, start, n):
    log = []
    out = list(itertools.islice(epoch_batches(
        lambda e, s: FakeLoader(e, s, per_epoch, in_flight, log), epoch, start), n))
    return [(e, b) for _, e, b in out], [(loader.epoch, e) for loader, e, _ in out], log


def test_same_batches_as_one_loader_per_epoch_from_a_resume_point():
    batches, loaders, _ = _run(per_epoch=5, in_flight=2, epoch=3, start=3, n=9)
    assert batches == [(3, (3, 3)), (3, (3, 4)), (4, (4, 0)), (4, (4, 1)), (4, (4, 2)), (4, (4, 3)), (4, (4, 4)),
                       (5, (5, 0)), (5, (5, 1))]
    assert all(loader_epoch == epoch for loader_epoch, epoch in loaders)


def test_next_loader_starts_when_only_prepared_batches_are_left():
    _, _, log = _run(per_epoch=5, in_flight=2, epoch=0, start=0, n=6)
    # epoch 0: batches 0..2 taken, then 2 left (= in flight): epoch 1 is built and started
    assert log[:7] == [("build", 0), ("take", 0, 0), ("take", 0, 1), ("take", 0, 2),
                       ("build", 1), ("start", 1), ("take", 0, 3)]
    assert log.index(("start", 1)) < log.index(("take", 1, 0))


def test_without_workers_the_next_loader_comes_after_the_last_batch():
    _, _, log = _run(per_epoch=3, in_flight=0, epoch=0, start=0, n=4)
    assert log[:6] == [("build", 0), ("take", 0, 0), ("take", 0, 1), ("take", 0, 2), ("build", 1), ("start", 1)]


def test_a_resume_at_the_end_of_an_epoch_goes_on_with_the_next():
    batches, _, log = _run(per_epoch=4, in_flight=2, epoch=7, start=4, n=2)
    assert batches == [(8, (8, 0)), (8, (8, 1))]
    assert log[:2] == [("build", 7), ("build", 8)]


def test_a_started_epoch_loader_yields_what_an_unstarted_one_yields():
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from modsquad_ds.data.loader import EpochLoader

    class Numbers(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for i in range(info.id if info else 0, 12, info.num_workers if info else 1):
                yield {"x": torch.tensor([i])}

    def loader():
        return EpochLoader(DataLoader(Numbers(), batch_size=None, num_workers=2, prefetch_factor=3), 12, 0, 0, 0)

    started = loader()
    assert started.in_flight == 6 and started.start() is started.start()  # idempotent
    assert [b["x"].item() for b in started] == [b["x"].item() for b in loader()]
