//! Values flowing through a lowered graph: float tensors live in candle (on the program's device,
//! differentiable); integer tensors (shapes, indices, axes) live on the host, so the shape
//! sub-graphs of dynamic-batch exports are evaluated on concrete shapes at every call.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

/// A host-side integer tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ints {
    pub dims: Vec<usize>,
    pub data: Vec<i64>,
}

impl Ints {
    pub fn new(dims: Vec<usize>, data: Vec<i64>) -> Self {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        Self { dims, data }
    }
    pub fn vector(data: Vec<i64>) -> Self {
        Self {
            dims: vec![data.len()],
            data,
        }
    }
    pub fn scalar(v: i64) -> Self {
        Self {
            dims: vec![],
            data: vec![v],
        }
    }
    /// A view as an n-dimensional array (row-major).
    pub fn view(&self) -> ndarray::ArrayViewD<'_, i64> {
        ndarray::ArrayViewD::from_shape(self.dims.as_slice(), &self.data)
            .expect("dims match data (checked at construction)")
    }
    /// From an n-dimensional array, in row-major order whatever its layout.
    pub fn from_array(a: ndarray::ArrayD<i64>) -> Self {
        let dims = a.shape().to_vec();
        let data = match a.as_slice() {
            Some(s) => s.to_vec(),
            None => a.iter().copied().collect(),
        };
        Self { dims, data }
    }
}

#[derive(Debug, Clone)]
pub enum Value {
    F(Tensor),
    I(Ints),
}

/// What ops need to know about where they run.
#[derive(Debug, Clone)]
pub struct RunCtx {
    pub device: Device,
    pub dtype: DType,
    /// BatchNormalization normalises with the batch's statistics (training) instead of the
    /// running ones (inference).
    pub bn_batch_stats: bool,
}

impl Value {
    /// The dims of either kind.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Value::F(t) => t.dims().to_vec(),
            Value::I(i) => i.dims.clone(),
        }
    }

    /// As a float tensor (integer values are moved to the device).
    pub fn float(&self, ctx: &RunCtx) -> Result<Tensor> {
        Ok(match self {
            Value::F(t) => t.clone(),
            Value::I(i) => {
                let v: Vec<f64> = i.data.iter().map(|&x| x as f64).collect();
                Tensor::from_vec(v, i.dims.clone(), &ctx.device)?.to_dtype(ctx.dtype)?
            }
        })
    }

    /// As host integers. Float tensors are converted (truncating toward zero, as Cast does); only
    /// small tensors are expected here (shapes, indices).
    pub fn ints(&self) -> Result<Ints> {
        Ok(match self {
            Value::I(i) => i.clone(),
            Value::F(t) => {
                if t.elem_count() > 1 << 20 {
                    bail!(
                        "a float tensor of {} elements used where integers are expected",
                        t.elem_count()
                    );
                }
                let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                Ints::new(t.dims().to_vec(), v.into_iter().map(|x| x as i64).collect())
            }
        })
    }
}
