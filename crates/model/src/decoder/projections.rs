//! Projections of the same input (q, k, v; gate, up) fused into one product
//! when their weights stack.

use super::*;

/// Projections of the same input (q, k, v; gate, up), run as one product
/// when their weights stack (same storage kind), else one by one.
pub(super) struct Projections {
    pub(super) fused: Option<Linear>,
    pub(super) parts: Vec<Linear>,
    pub(super) sizes: Vec<usize>,
}

impl Projections {
    pub(super) fn new(parts: Vec<Linear>) -> Result<Projections> {
        let sizes = parts.iter().map(Linear::out_features).collect::<Result<Vec<_>>>()?;
        Ok(match Linear::concat(&parts)? {
            Some(fused) => Projections { fused: Some(fused), parts: Vec::new(), sizes },
            None => Projections { fused: None, parts, sizes },
        })
    }

    /// Adds part `i`'s adapter update `factors[i]` = `(A, scale · B)`, if
    /// any (see [`Linear::add_low_rank`]); a fused projection takes the
    /// parts' factors stacked ([`LowRank::stacked`]).
    pub(super) fn add_low_rank(&mut self, factors: &[Option<(Tensor, Tensor)>]) -> Result<()> {
        let parts = factors
            .iter()
            .map(|fac| fac.as_ref().map(|(a, b)| LowRank::new(a, b)).transpose())
            .collect::<Result<Vec<_>>>()?;
        match &mut self.fused {
            Some(f) => {
                if let Some(stacked) = LowRank::stacked(&parts, &self.sizes)? {
                    f.add_low_rank(stacked)?;
                }
            }
            None => {
                for (p, part) in self.parts.iter_mut().zip(parts) {
                    if let Some(l) = part {
                        p.add_low_rank(l)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The projections of `x`, each plus the adapter's term for `kinds[i]`.
    ///
    /// With an adapter over float weights, the frozen products are computed
    /// without a graph (still as one product when fused) and each part joins
    /// the graph as one op with its adapter term ([`Adapter::project`]),
    /// instead of a product, a split and an addition.
    pub(super) fn forward(&self, x: &Tensor, kinds: &[Proj], adapter: Option<LayerAdapter>) -> Result<Vec<Tensor>> {
        Ok(self.forward_kept(x, kinds, adapter, None)?.0)
    }

    /// [`Projections::forward`], also returning the frozen products (one
    /// tensor when fused) where the adapter path computed them without a
    /// graph, and taking them from `kept` instead of computing them when
    /// given (a recomputation).
    pub(super) fn forward_kept(
        &self,
        x: &Tensor,
        kinds: &[Proj],
        adapter: Option<LayerAdapter>,
        kept: Option<Vec<Tensor>>,
    ) -> Result<(Vec<Tensor>, Option<Vec<Tensor>>)> {
        if let (Some(a), Some(weights)) = (adapter, self.frozen_parts()?) {
            let frozen = match kept {
                Some(k) => k,
                None => self.products(&x.detach())?,
            };
            let ys = self
                .split(frozen.clone())?
                .into_iter()
                .zip(weights.iter().zip(kinds))
                .map(|(y, (w, &k))| a.with_base(k, x, y, w))
                .collect::<Result<_>>()?;
            return Ok((ys, Some(frozen)));
        }
        let base = self.split(self.products(x)?)?;
        Ok((
            base.into_iter().zip(kinds).map(|(y, &k)| LayerAdapter::add(adapter, k, x, y)).collect::<Result<_>>()?,
            None,
        ))
    }

    /// The products of `x`: one tensor when fused, else one per part.
    pub(super) fn products(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.fused {
            Some(f) => Ok(vec![f.forward(x)?]),
            None => self.parts.iter().map(|p| p.forward(x)).collect(),
        }
    }

    /// The parts' outputs from [`Projections::products`].
    pub(super) fn split(&self, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match self.fused {
            Some(_) => self.by_part(&outputs[0], D::Minus1),
            None => Ok(outputs),
        }
    }

    /// `t` cut along `dim` into the parts' sizes.
    pub(super) fn by_part(&self, t: &Tensor, dim: D) -> Result<Vec<Tensor>> {
        let dim = candle_core::shape::Dim::to_index(&dim, t.shape(), "by_part")?;
        let mut at = 0;
        self.sizes
            .iter()
            .map(|&n| {
                let part = t.narrow(dim, at, n);
                at += n;
                Ok(part?)
            })
            .collect()
    }

    /// Each part's frozen float weight `(out, in)` (with its rows of the
    /// fused weight's tiles, if packed); `None` for other storage.
    pub(super) fn frozen_parts(&self) -> Result<Option<Vec<Frozen>>> {
        let Some(f) = &self.fused else {
            return Ok(self.parts.iter().map(Linear::frozen).collect());
        };
        let Some(fused) = f.frozen() else {
            return Ok(None);
        };
        let mut at = 0;
        self.sizes
            .iter()
            .map(|&n| {
                let part = fused.rows(at, n);
                at += n;
                part
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Packs the weights for bf16 tile products; the number of weights
    /// packed. A fused weight is packed only where each part starts at a
    /// multiple of 32 rows (its parts' gradients read their rows' tiles).
    pub(super) fn use_bf16_products(&mut self) -> usize {
        match &mut self.fused {
            Some(f) if self.sizes.iter().all(|n| n.is_multiple_of(32)) => f.use_bf16_products() as usize,
            Some(_) => 0,
            None => self.parts.iter_mut().map(|p| p.use_bf16_products() as usize).sum(),
        }
    }
}
