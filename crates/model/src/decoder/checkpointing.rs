//! Gradient checkpointing for LoRA training: layer inputs kept, each layer's
//! forward recomputed during its backward.

use super::*;

impl Model {
    /// Forward and backward with activation checkpointing: the layers run
    /// once without keeping their graphs (only each layer's input is kept),
    /// `head` turns the final hidden states into a loss, and the backward
    /// recomputes one layer at a time from its kept input. Peak memory is
    /// one layer's graph instead of all of them, for about a third more
    /// compute (less the down projections: a recomputed layer's output
    /// value is never read, only its gradients, so that last product is
    /// not recomputed).
    ///
    /// With `keep_mlp`, the first pass also keeps each layer's frozen
    /// gate/up products (`2 × intermediate` values per token and layer,
    /// six times a layer input for SmolLM2), and the recomputation reuses
    /// them: the costliest half of a layer's products is not redone.
    ///
    /// Returns the gradients of `vars` (the adapter's variables, `None` for
    /// one that got none) and what `head` returned beside the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_checkpointed<T>(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        adapter: &dyn Adapter,
        vars: &[Tensor],
        keep_mlp: bool,
        head: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
    ) -> Result<(Vec<Option<Tensor>>, T)> {
        let (b, t) = ids.dims2()?;
        let rope = self.rope.at(positions)?;
        let mask = mask.to_dtype(self.dtype)?;
        let eps = self.config.rms_norm_eps;
        type Kept = Option<Vec<Tensor>>;
        let layer_fwd = |i: usize, x: &Tensor, need: Need, kept: Kept| -> Result<(Tensor, Kept)> {
            let layer = &self.layers[i];
            let la = Some(LayerAdapter { adapter, layer: i });
            let a = ops::rms_norm(x, &layer.input_layernorm, eps)?;
            let h = (x + layer.self_attn.forward(&a, &rope, Some(&mask), None, la)?)?;
            let m = ops::rms_norm(&h, &layer.post_attention_layernorm, eps)?;
            let (y, products) = layer.mlp.forward_for(&m, la, need, kept)?;
            Ok(((&h + y)?, products))
        };
        // The first pass keeps each layer's input only, so it records no
        // graph (no pass-through copies, no saved probabilities).
        let was_tracking = adapter.track(false);
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut kept = Vec::with_capacity(self.layers.len());
        let mut h = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        let first_pass = (0..self.layers.len()).try_for_each(|i| -> Result<()> {
            let (out, products) = layer_fwd(i, &h, Need::Value, None)?;
            inputs.push(std::mem::replace(&mut h, out.detach()));
            kept.push(products.filter(|_| keep_mlp));
            Ok(())
        });
        adapter.track(was_tracking);
        first_pass?;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut collect = |store: &candle_core::backprop::GradStore| -> Result<()> {
            for (slot, v) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(v) {
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };
        let top = candle_core::Var::from_tensor(&h)?;
        let (loss, extra) = head(&ops::rms_norm(top.as_tensor(), &self.norm, eps)?)?;
        let store = loss.backward()?;
        collect(&store)?;
        let mut upstream = store.get(top.as_tensor()).cloned();
        drop(store);
        for i in (0..self.layers.len()).rev() {
            let Some(dh) = upstream.take() else { break };
            let x = candle_core::Var::from_tensor(&inputs[i])?;
            // Only `y`'s gradients are used (`y · dh` is never read), so
            // the down projection's product is skipped.
            let (y, _) = layer_fwd(i, x.as_tensor(), Need::Gradient, kept[i].take())?;
            let store = (y * dh)?.sum_all()?.backward()?;
            collect(&store)?;
            upstream = store.get(x.as_tensor()).cloned();
        }
        Ok((grads, extra))
    }
}
