"""The recording batch-norm classes as drop-in replacements: every check runs on torch's class
and on ours (``impl``), so each assertion is seen to hold for nn.BatchNorm1d/2d/3d too.

The cases come from PyTorch's own module test database (torch.testing._internal.common_modules:
the sample constructor arguments and inputs torch tests nn.BatchNorm1d/2d/3d with, including
its error inputs), plus construction, repr, pickling, dtype/device moves, state_dict keys, empty
batches, gradcheck with batched gradients and torch.func."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import gradstats
from gradstats import GradStatBatchNorm1d, GradStatBatchNorm2d, GradStatBatchNorm3d, GradStatSyncBatchNorm

pytest.importorskip("expecttest", reason="torch's module test database needs expecttest (test extra)")
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

OURS = {
    nn.BatchNorm1d: GradStatBatchNorm1d,
    nn.BatchNorm2d: GradStatBatchNorm2d,
    nn.BatchNorm3d: GradStatBatchNorm3d,
    nn.SyncBatchNorm: GradStatSyncBatchNorm,
}
IMPLS = ["torch", "gradstats"]
_DB = {info.module_cls: info for info in module_db if info.module_cls in OURS}


def _cls(torch_cls, impl):
    return torch_cls if impl == "torch" else OURS[torch_cls]


def _samples(torch_cls, training, requires_grad=True):
    return _DB[torch_cls].module_inputs_func(
        _DB[torch_cls], device="cpu", dtype=torch.float64, requires_grad=requires_grad, training=training
    )


def _sample_ids():
    return [
        pytest.param(cls, index, training, id=f"{cls.__name__}-{index}-{'train' if training else 'eval'}")
        for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        for training in (True, False)
        for index in range(len(_samples(cls, training)))
    ]


def _layouts(x):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("torch_cls", "index", "training"), _sample_ids())
def test_module_db_samples_match_torch(impl, torch_cls, index, training):
    """torch's sample constructions and inputs: same output, input/weight/bias gradients and
    buffers as a fresh torch module, every layout; a recording module records exactly the
    backward passes with values (an empty batch records nothing)."""
    sample = _samples(torch_cls, training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    x = sample.forward_input.args[0].detach()
    torch.manual_seed(index)
    for layout, xl in _layouts(x * 2 + 0.5):
        reference = torch_cls(*args, **kwargs, dtype=torch.float64).train(training)
        module = _cls(torch_cls, impl)(*args, **kwargs, dtype=torch.float64).train(training)
        with torch.no_grad():
            for p in reference.parameters():
                p.uniform_(0.5, 1.5)
            if reference.running_var is not None:
                reference.running_var.uniform_(0.5, 2.0)
                reference.running_mean.normal_()
        module.load_state_dict(reference.state_dict())  # strict, both ways: the same keys
        reference.load_state_dict(module.state_dict())
        outputs, grads = [], []
        grad_y = None
        for m in (reference, module):
            xi = xl.clone().requires_grad_()
            y = m(xi)
            grad_y = torch.randn_like(y) if grad_y is None else grad_y
            y.backward(grad_y)
            outputs.append(y)
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12, msg=layout)
        assert outputs[1].stride() == outputs[0].stride(), layout
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=layout)
        for (name, got), (_, want) in zip(module.named_buffers(), reference.named_buffers()):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{layout} {name}")
        if impl == "gradstats":
            if x.numel() == 0:
                assert module.last_grad_stats is None and not module.grad_stats_state.any()
            else:
                stats = module.last_grad_stats
                dy = grad_y.movedim(1, 0).reshape(grad_y.shape[1], -1)
                var, mean = torch.var_mean(dy, dim=1, correction=0)
                torch.testing.assert_close(stats.grad_output.mean, mean)
                torch.testing.assert_close(stats.grad_output.var, var)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "torch_cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d], ids=lambda c: c.__name__
)
def test_module_db_error_inputs_raise_torch_errors(impl, torch_cls):
    """torch's error inputs (eps <= 0, which torch refuses in training)."""
    info = _DB[torch_cls]
    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )
    assert errors
    for error in errors:
        sample = error.module_error_input
        cls = _cls(torch_cls, impl)
        with pytest.raises(error.error_type, match=error.error_regex):
            m = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
            assert error.error_on == ModuleErrorEnum.FORWARD_ERROR
            m(*sample.forward_input.args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_errors_are_torch_errors(impl, training):
    """Same exception type and message as nn.BatchNorm2d for bad arguments and inputs."""
    cases = [
        (dict(num_features=3, dtype=torch.float64), torch.randn(2, 3, 4, 4)),  # mixed dtypes
        (dict(num_features=3), torch.randn(2, 5, 4, 4)),  # wrong channel count
        (dict(num_features=3), torch.randn(2, 3, 4)),  # wrong rank
        (dict(num_features=3), torch.randint(0, 3, (2, 3, 4, 4))),  # integer input
        (dict(num_features=3, eps=0.0), torch.randn(2, 3, 4, 4)),  # eps must be positive (train)
        (dict(num_features=3, eps=-1e-3), torch.randn(2, 3, 4, 4)),  # eps must be non-negative
        (dict(num_features=3), torch.randn(1, 3, 1, 1)),  # one value per channel (train)
    ]
    for kwargs, x in cases:
        if x.is_floating_point():
            x.requires_grad_()
        results = []
        for cls in (nn.BatchNorm2d, _cls(nn.BatchNorm2d, impl)):
            m = cls(**kwargs).train(training)
            try:
                m(x)
                results.append(None)
            except Exception as error:  # noqa: BLE001 - the exception itself is compared
                results.append((type(error), str(error)))
        assert results[1] == results[0], (kwargs, tuple(x.shape))


def test_constructor_takes_every_argument_of_torch():
    """Every parameter of torch's constructors (today's: ``bias``, ``device``, ``dtype``, ...)
    is accepted by name and by position and reaches the module as it does torch's."""
    for torch_cls, ours in OURS.items():
        parameters = list(inspect.signature(torch_cls.__init__).parameters.values())[1:]
        values = {
            "num_features": 4,
            "eps": 1e-3,
            "momentum": 0.3,
            "affine": True,
            "track_running_stats": False,
            "process_group": None,
            "device": "cpu",
            "dtype": torch.float64,
            "bias": False,
        }
        kwargs = {p.name: values[p.name] for p in parameters}
        a, b = torch_cls(**kwargs), ours(**kwargs, grad_stats_ema_decay=0.5)
        assert repr(b) == repr(a).replace(torch_cls.__name__, ours.__name__, 1)
        assert [(n, t.dtype, t.shape) for n, t in b.state_dict().items()] == [
            (n, t.dtype, t.shape) for n, t in a.state_dict().items()
        ]
        assert b.grad_stats_ema_decay == 0.5
        positional = [values[p.name] for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert repr(ours(*positional)) == repr(torch_cls(*positional)).replace(
            torch_cls.__name__, ours.__name__, 1
        )
        with pytest.raises(TypeError):
            ours(4, no_such_argument=1)
        with pytest.raises(ValueError, match="grad_stats_ema_decay"):
            ours(4, grad_stats_ema_decay=1.5)


SHAPES = {
    nn.BatchNorm1d: (4, 3, 5),
    nn.BatchNorm2d: (4, 3, 2, 2),
    nn.BatchNorm3d: (4, 3, 2, 2, 2),
    nn.SyncBatchNorm: (4, 3, 5),
}
EVERY_CLASS = pytest.mark.parametrize("torch_cls", list(SHAPES), ids=lambda c: c.__name__)


@pytest.mark.parametrize("impl", IMPLS)
@EVERY_CLASS
def test_dtype_device_moves_and_state_dict_keys(impl, torch_cls):
    """``.to(dtype)``, ``.half()`` and ``dtype=`` give every buffer the dtype torch gives it;
    the statistics (not a buffer) stay float64 and exact; state_dict keys are torch's."""
    reference = torch_cls(3)
    m = _cls(torch_cls, impl)(3)
    m(torch.randn(SHAPES[torch_cls], requires_grad=True)).sum().backward()
    state = getattr(m, "grad_stats_state", torch.zeros(1)).clone()
    for move in (lambda t: t.to(torch.float16), lambda t: t.double(), lambda t: t.to("cpu", torch.bfloat16)):
        move(reference), move(m)
        assert [(n, b.dtype) for n, b in m.named_buffers()] == [
            (n, b.dtype) for n, b in reference.named_buffers()
        ]
        assert [(n, p.dtype) for n, p in m.named_parameters()] == [
            (n, p.dtype) for n, p in reference.named_parameters()
        ]
        assert list(m.state_dict()) == list(reference.state_dict())
    made = _cls(torch_cls, impl)(3, dtype=torch.float16)
    assert {b.dtype for b in made.buffers() if b.is_floating_point()} == {torch.float16}
    if impl == "gradstats":
        assert m.grad_stats_state.dtype == torch.float64 and torch.equal(m.grad_stats_state, state)


@pytest.mark.parametrize("impl", IMPLS)
@EVERY_CLASS
def test_pickle_deepcopy_and_torch_save(impl, torch_cls):
    torch.manual_seed(0)
    m = _cls(torch_cls, impl)(3)
    m(torch.randn(SHAPES[torch_cls], requires_grad=True)).sum().backward()
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(m)), copy.deepcopy(m), torch.load(buffer, weights_only=False)]
    for c in copies:
        assert type(c) is type(m) and repr(c) == repr(m)
        for (name, a), (_, b) in zip(c.state_dict().items(), m.state_dict().items()):
            assert torch.equal(a, b), name
        if impl == "gradstats":
            assert torch.equal(c.grad_stats_state, m.grad_stats_state)
            assert c.grad_stats_state.data_ptr() != m.grad_stats_state.data_ptr()


def test_recording_classes_of_other_batchnorm_classes_pickle():
    """A recording class created at run time (a user's subclass) pickles and unpickles too."""
    m = gradstats.convert_batchnorm(nn.Sequential(_CustomBatchNorm(3)))
    m(torch.randn(4, 3, 2, 2, requires_grad=True)).sum().backward()
    clone = pickle.loads(pickle.dumps(m))
    assert type(clone[0]) is type(m[0]) and isinstance(clone[0], _CustomBatchNorm)
    assert torch.equal(clone[0].grad_stats_state, m[0].grad_stats_state)


class _CustomBatchNorm(nn.BatchNorm2d):
    """A subclass with its own forward calling F.batch_norm, as timm's BatchNormAct2d does."""

    def forward(self, x):
        y = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )
        return torch.relu(y)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@EVERY_CLASS
def test_empty_batch_is_torch_behaviour(impl, training, channels_last, torch_cls):
    """An empty batch gives an empty output and dx, zero dweight and dbias, as torch's layers
    do; it records nothing (no NaN)."""
    m = _cls(torch_cls, impl)(3).train(training)
    shape = (0,) + SHAPES[torch_cls][1:]
    x = torch.randn(shape)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_()
    y = m(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(m.weight.grad, torch.zeros(3)) and torch.equal(m.bias.grad, torch.zeros(3))
    if impl == "gradstats":
        assert m.last_grad_stats is None and not m.grad_stats_state.any()
        full = (4,) + shape[1:]
        m(torch.randn(full, requires_grad=True)).sum().backward()  # and then records as usual
        assert (m.last_grad_stats.grad_output.count == torch.Size(full).numel() // 3).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_with_batched_gradients(impl, training):
    torch.manual_seed(1)
    m = _cls(nn.BatchNorm2d, impl)(3, dtype=torch.float64, momentum=0.0).train(training)
    with torch.no_grad():
        m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 2)
    x = torch.randn(3, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(m, (x,), check_batched_grad=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmapped_backward_gives_the_loop_and_records_nothing(impl):
    """A vmap over the backward (is_grads_batched) equals one backward per grad_output; the
    batched backward is not a training step and leaves the statistics as they were."""
    torch.manual_seed(2)
    m = _cls(nn.BatchNorm2d, impl)(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = m(x)
    grads = torch.randn(5, *y.shape, dtype=torch.float64)
    state = getattr(m, "grad_stats_state", torch.zeros(1)).clone()
    (batched,) = torch.autograd.grad(y, x, grads, is_grads_batched=True, retain_graph=True)
    if impl == "gradstats":
        assert torch.equal(m.grad_stats_state, state)
    looped = torch.stack([torch.autograd.grad(y, x, g, retain_graph=True)[0] for g in grads])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_func_transforms(impl):
    """torch.func.vmap over samples (eval mode, as torch requires for modules with running
    statistics) and torch.func.grad through functional_call give torch's results."""
    torch.manual_seed(3)
    reference = nn.BatchNorm2d(3, dtype=torch.float64).eval()
    with torch.no_grad():
        reference.running_var.uniform_(0.5, 2)
    m = _cls(nn.BatchNorm2d, impl)(3, dtype=torch.float64).eval()
    m.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(m)(x), torch.func.vmap(reference)(x))
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(module):
        return lambda p, xs: torch.func.functional_call(module, p, (xs,)).square().sum()

    got = torch.func.grad(loss(m))(params, x[0])
    want = torch.func.grad(loss(reference))(params, x[0])
    for name in params:
        torch.testing.assert_close(got[name], want[name])


def test_converting_torch_classes_gives_the_exported_recording_classes():
    # GradStatSyncBatchNorm puts its synchronised forward before nn.SyncBatchNorm in its bases:
    # converting an nn.SyncBatchNorm must still give it (not a class without that forward).
    for torch_cls, ours in OURS.items():
        assert gradstats.recording_class(torch_cls) is ours, torch_cls
        model = nn.Sequential(torch_cls(4))
        gradstats.convert_batchnorm(model)
        assert type(model[0]) is ours, (torch_cls, type(model[0]).__mro__)
