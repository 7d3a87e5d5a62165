import math

import pytest
import torch

from models import dct_matrix, orthonormal_codebooks


def test_dct_matrix_follows_the_formula():
    d = 12
    c = dct_matrix(d)
    for j in range(d):
        for k in range(d):
            expected = math.sqrt(2 / d) * math.cos(math.pi * (j + 0.5) * k / d)
            if k == 0:
                expected /= math.sqrt(2)
            assert c[j, k].item() == pytest.approx(expected, abs=1e-12)


def test_books_are_powers_of_the_dct_matrix():
    books = orthonormal_codebooks(num_books=4, num_words=8, word_dim=16)
    assert books.shape == (4, 16, 8)
    assert books.dtype == torch.float32
    c = dct_matrix(16)
    power = torch.eye(16, dtype=torch.float64)
    for m in range(4):
        power = c @ power
        torch.testing.assert_close(books[m], power[:, :8].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("m,k,d", [(2, 256, 256), (6, 64, 86), (8, 64, 64), (4, 16, 128)])
def test_every_book_is_orthonormal(m, k, d):
    books = orthonormal_codebooks(m, k, d).double()
    eye = torch.eye(k, dtype=torch.float64)
    for book in books:
        torch.testing.assert_close(book.T @ book, eye, atol=1e-5, rtol=0)


def test_books_differ_from_each_other():
    books = orthonormal_codebooks(3, 8, 8)
    assert not torch.allclose(books[0], books[1])
    assert not torch.allclose(books[1], books[2])


def test_more_words_than_dimensions_is_refused():
    with pytest.raises(ValueError, match="num_words=256 exceeds the sub-vector dimension word_dim=128"):
        orthonormal_codebooks(4, 256, 128)


def test_smallest_sizes_and_argument_checks():
    assert dct_matrix(1).shape == (1, 1)
    assert orthonormal_codebooks(1, 1, 1).shape == (1, 1, 1)
    with pytest.raises(ValueError, match="DCT size must be positive"):
        dct_matrix(0)
    with pytest.raises(ValueError, match="num_books must be positive"):
        orthonormal_codebooks(0, 2, 4)
    with pytest.raises(ValueError, match="num_words must be positive"):
        orthonormal_codebooks(1, 0, 4)
