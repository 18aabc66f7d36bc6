//! Hand-written backwards attached to candle's graph: a value computed without
//! a graph plus the closure that returns its inputs' gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `value` (computed from `x` without a graph) attached to `x`, with
/// `backward` mapping the value's gradient to `x`'s: a frozen product whose
/// input gradient another kernel computes.
pub fn with_input_gradient(x: &Tensor, value: &Tensor, backward: Backward) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value.clone());
    }
    attach(x, &value.contiguous()?, "frozen-matmul-grad", backward)
}

/// `d/dx` of a value computed from `x` outside the graph.
pub type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Attaches `y`, computed from `x` without a graph, to `x`, with `backward`
/// mapping the gradient of `y` to the gradient of `x`.
pub(super) fn attach(x: &Tensor, y: &Tensor, name: &'static str, backward: Backward) -> Result<Tensor> {
    x.apply_op2_arc(y, Arc::new(Box::new(PassThrough { name, backward })))
}

/// Passes a precomputed value through, with a hand-written backward.
pub(super) struct PassThrough {
    pub(super) name: &'static str,
    pub(super) backward: Backward,
}

impl CustomOp2 for PassThrough {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        // The precomputed value is the fresh result of an op: contiguous from offset 0.
        if !l2.is_contiguous() || l2.start_offset() != 0 {
            candle_core::bail!("{}: the precomputed value must be contiguous", self.name);
        }
        Ok((s2.clone(), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if !l2.is_contiguous() || l2.start_offset() != 0 {
            candle_core::bail!("{}: the precomputed value must be contiguous", self.name);
        }
        use candle_core::backend::BackendStorage;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(grad)?), None))
    }
}

/// Attaches `value`, computed from `inputs` without a graph, to all three
/// as one op whose backward is `backward`: one graph node where three
/// pass-throughs would need two additions and a zero tensor, forward and
/// backward.
pub fn attach3(inputs: [&Tensor; 3], value: Tensor, name: &'static str, backward: Backward3) -> Result<Tensor> {
    attach3_value(inputs, Precomputed::Tensor(value), name, backward)
}

/// [`attach3`] for a value computed into a CPU buffer, which becomes the
/// result's storage as it is (a tensor's storage is copied).
pub fn attach3_cpu(
    inputs: [&Tensor; 3],
    value: Vec<f32>,
    shape: Shape,
    name: &'static str,
    backward: Backward3,
) -> Result<Tensor> {
    if value.len() != shape.elem_count() {
        candle_core::bail!("{name}: {} values for shape {shape:?}", value.len());
    }
    attach3_value(inputs, Precomputed::Cpu(CpuStorage::F32(value), shape), name, backward)
}

fn attach3_value(inputs: [&Tensor; 3], value: Precomputed, name: &'static str, backward: Backward3) -> Result<Tensor> {
    let [a, b, c] = inputs;
    a.apply_op3_arc(
        b,
        c,
        Arc::new(Box::new(Precomputed3 { name, value: std::sync::Mutex::new(Some(value)), backward })),
    )
}

/// A value computed outside the graph: a tensor, or a CPU buffer handed over whole.
pub(super) enum Precomputed {
    Tensor(Tensor),
    Cpu(CpuStorage, Shape),
}

/// The op of [`attach3`].
pub(super) struct Precomputed3 {
    pub(super) name: &'static str,
    /// Taken by the forward, which runs once.
    pub(super) value: std::sync::Mutex<Option<Precomputed>>,
    pub(super) backward: Backward3,
}

impl Precomputed3 {
    pub(super) fn take(&self) -> Result<Precomputed> {
        let value = self.value.lock().expect("the precomputed-value lock is never poisoned").take();
        let Some(value) = value else { candle_core::bail!("{}: the forward ran twice", self.name) };
        Ok(match value {
            Precomputed::Tensor(t) => Precomputed::Tensor(t.contiguous()?),
            cpu => cpu,
        })
    }
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = match self.take()? {
            Precomputed::Cpu(storage, shape) => return Ok((storage, shape)),
            Precomputed::Tensor(t) => t,
        };
        let exact = |v: &Tensor| -> Option<(CpuStorage, Shape)> {
            let (storage, layout) = v.storage_and_layout();
            let candle_core::Storage::Cpu(c) = &*storage else { return None };
            let len = match c {
                CpuStorage::F32(x) => x.len(),
                CpuStorage::BF16(x) => x.len(),
                CpuStorage::F16(x) => x.len(),
                _ => return None,
            };
            (layout.start_offset() == 0 && len == v.elem_count()).then(|| (c.clone(), v.shape().clone()))
        };
        // A fresh result (the usual case) is cloned whole; a view is copied first.
        match exact(&value).or_else(|| value.copy().ok().and_then(|c| exact(&c))) {
            Some(out) => Ok(out),
            None => candle_core::bail!("{}: the value is not a CPU float tensor", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let Precomputed::Tensor(value) = self.take()? else {
            candle_core::bail!("{}: the value is on the CPU", self.name)
        };
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(layout)?, value.shape().clone())),
            _ => candle_core::bail!("{}: the value is not on the GPU", self.name),
        }
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [a, b, c] = (self.backward)(&grad.contiguous()?)?;
        Ok((a, b, c))
    }
}

/// The gradients of an op's three inputs (`None`: not needed) for its
/// output's gradient.
pub type Backward3 = Box<dyn Fn(&Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync>;
