"""Test weights and comparisons shared by the tensor-format tests."""
import torch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def student_t(shape: tuple[int, ...], df: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights: a normal over the root of an independent chi-squared / df."""
    g = gen(seed)
    z = torch.randn(*shape, generator=g)
    return z / (torch.randn(df, *shape, generator=g).square().sum(0) / df).sqrt()


def same_tensors(a, b) -> bool:
    """Two QuantizedTensors store the same tensors bit for bit (fp16 -0.0 and 0.0 differ)."""
    bits = lambda t: t.view(torch.int16) if t.dtype == torch.float16 else t  # noqa: E731
    return set(a.tensors) == set(b.tensors) and all(torch.equal(bits(a.tensors[k]), bits(b.tensors[k]))
                                                    for k in a.tensors)


def hessian(width: int = 128, seed: int = 5) -> torch.Tensor:
    """An input Hessian ``XᵀX / n`` of correlated inputs (2048 rows), as GPTQ tests need."""
    g = gen(seed)
    x = torch.randn(2048, width, generator=g) @ torch.randn(width, width, generator=g)
    return x.T @ x / 2048
