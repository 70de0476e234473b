/* Body of kernels/cpu_step.c for one float type: included once with SCALAR = float,
 * SUFFIX = f32 and once with double / f64. Not a header of its own. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

/* Deliver the K slots of sample b and evaluate its receivers (SPEC 5.2-5.4).
 * Record pointers (v_pre, flags) may be NULL; `bk` (forward bookkeeping) 0 or 1.
 * flags: one byte per column, 0 off the receivers, else RECEIVED | refractory
 * before (REFR_BEFORE) | gate (GATE) (kernels/step_spec.py).
 * Fillers (fill_slots: entries -1 - column) are delivered but not counted: `cnt`
 * holds 2 n_slots counters, [0, n_slots) every delivered entry per source layer
 * (which layers receive), [n_slots, 2 n_slots) the counted ones (n_in).
 * Returns 1 if an output neuron fired. */
static int FN(evaluate)(const Ctx *c, int64_t b, uint32_t h_ref, const int32_t *sel,
                        const int32_t *sd, SCALAR *vals, SCALAR *cur, int32_t *cnt,
                        SCALAR *v_pre, uint8_t *flags, int bk) {
    const int64_t W = c->W, K = c->K, F = c->F, n_out = c->out_hi - c->out_lo;
    SCALAR *v = (SCALAR *)c->v + b * W, *o = (SCALAR *)c->o + b * W;
    SCALAR *acc = (SCALAR *)c->acc + b * n_out;
    uint8_t *refr = c->refr + b * W;
    int32_t *n_in = c->n_in + b * W;
    const SCALAR *wt = (const SCALAR *)c->wt, *theta = (const SCALAR *)c->theta;
    int32_t *counted = cnt + c->n_slots;
    for (int64_t j = 0; j < K; j++) vals[j] = o[DEC(sd[j])];
    for (int64_t j = 0; j < K; j++) o[DEC(sel[j])] = 0;
    memset(cnt, 0, sizeof(int32_t) * 2 * c->n_slots);
    for (int64_t j = 0; j < K; j++) {
        cnt[c->source_slot[DEC(sd[j])]]++;
        if (sd[j] >= 0) counted[c->source_slot[sd[j]]]++;
    }
    /* Only the layers a delivered source reaches change (fully connected: layer l + 1
     * for a source of layer l). */
    for (int64_t l = 0; l < c->n_slots; l++)
        if (cnt[l]) memset(cur + c->slot_lo[l], 0, sizeof(SCALAR) * (c->slot_hi[l] - c->slot_lo[l]));
    /* The torch twin's scatter_add order (slot, then entry). A source of layer l reaches
     * the contiguous columns of layer l + 1 with row entries 0 .. n - 1; the rest of the
     * row is padding (zero weights the twin sends to the dump column, never read). */
    for (int64_t j = 0; j < K; j++) {
        const int64_t s = DEC(sd[j]), l = c->source_slot[s], lo = c->slot_lo[l], n = c->slot_hi[l] - lo;
        const SCALAR x = vals[j], *w = wt + s * F;
        SCALAR *dst = cur + lo;
        for (int64_t f = 0; f < n; f++) dst[f] += w[f] * x;
    }
    const float p_ref = (float)c->p_ref;
    uint8_t *pending = bk ? c->pending + b * W : NULL;
    uint8_t *fillable = bk && c->fill ? c->fillable + b * W : NULL;
    SCALAR *pre = bk ? (SCALAR *)c->pre_spike + b * W : NULL;
    SCALAR *ssum = bk ? (SCALAR *)c->spike_sum + b * W : NULL;
    if (flags) memset(flags, 0, W);  /* v_pre is defined at receivers, the flags everywhere */
    int out_any = 0;
    for (int64_t l = 0; l < c->n_slots; l++) {
      const int32_t nadd = counted[l];
      if (!cnt[l]) continue;
      for (int64_t col = c->slot_lo[l]; col < c->slot_hi[l]; col++) {
        const int32_t nb = n_in[col], ni = nb + nadd;
        n_in[col] = ni;
        const uint8_t g = ni >= c->sync[col], rf = refr[col];
        const SCALAR vp = rf ? (SCALAR)0 : v[col] + cur[col];
        const uint8_t s = g && vp >= theta[col];
        const SCALAR sf = s ? (SCALAR)1 : (SCALAR)0;
        const int out = col >= c->out_lo && col < c->out_hi;
        v[col] = vp - vp * sf;
        o[col] = o[col] + sf * (c->is_source[col] ? (SCALAR)1 : (SCALAR)0);
        if (out) acc[col - c->out_lo] = acc[col - c->out_lo] + sf;
        if (c->refractory && s) {
            const int fired = c->p_ref > 0 ? uniform_at(h_ref, b, col) >= p_ref : 1;
            if (fired) refr[col] = 1;
        }
        if (v_pre) {
            v_pre[col] = vp;
            flags[col] = (uint8_t)((rf ? REFR_BEFORE : 0) | RECEIVED | (g ? GATE : 0));
        }
        if (bk) {
            if (c->is_source[col] && (s || (c->barrier && nb < c->sync[col] && ni >= c->sync[col])))
                pending[col] = 1;
            if (c->policy_ms && s) pre[col] = vp;
            /* fill_slots: the outbox holds surrogate gradient (synced, not clamped) */
            if (fillable && g && !rf && c->is_source[col]) fillable[col] = 1;
            ssum[col] = ssum[col] + sf;
            if (s && out) out_any = 1;
            if (s && c->hist_bins) c->hist[ni < c->hist_bins - 1 ? ni : c->hist_bins - 1]++;
        }
      }
    }
    return out_any;
}

/* One forward step of the whole batch: select (MS/RS, SPEC 6 ties), network dropout,
 * deliver, evaluate, bookkeeping; then the stop condition of every sample (`done`).
 * Writes sel, sel_deliv (int32 [B, K]), vals ([B, K]) and out_fired ([B]).
 * Returns 1 when every sample is done. Scratch: cur [W] SCALAR, cand [W] int64. */
int FN(at_forward_step)(const Ctx *c, int64_t t, int64_t k, int32_t *sel, int32_t *sel_deliv,
                        SCALAR *vals, uint8_t *out_fired, SCALAR *cur, int64_t *cand) {
    const int64_t B = c->B, W = c->W, K = c->K, dump = W - 1;
    const uint32_t seed = c->seed;
    const uint32_t h_key = counter_hash(seed, c->policy_ms ? STREAM_MOMENTUM_NOISE : STREAM_RS_KEY,
                                        (uint32_t)t, (uint32_t)k);
    const uint32_t h_drop = counter_hash(seed, STREAM_NETWORK_DROPOUT, (uint32_t)t, (uint32_t)k);
    const uint32_t h_ref = counter_hash(seed, STREAM_REFRACTORY_DROPOUT, (uint32_t)t, (uint32_t)k);
    const uint32_t h_order = counter_hash(seed, STREAM_INPUT_ORDER, (uint32_t)t, 0);
    const uint32_t h_fill = counter_hash(seed, STREAM_FILL, (uint32_t)t, (uint32_t)k);
    const float noise = (float)c->noise, p_net = (float)c->p_net;
    int32_t cnt[2 * c->n_slots];
    for (int64_t b = 0; b < B; b++) {
        int32_t *s = sel + b * K, *sd = sel_deliv + b * K;
        SCALAR *vb = vals + b * K;
        out_fired[b] = 0;
        if (c->done[b]) {
            for (int64_t j = 0; j < K; j++) { s[j] = sd[j] = (int32_t)dump; vb[j] = ((SCALAR *)c->o)[b * W + dump]; }
            continue;
        }
        uint8_t *pend = c->pending + b * W;
        const SCALAR *pre = (const SCALAR *)c->pre_spike + b * W;
        int64_t m = 0;
        for (int64_t col = 0; col < W; col++) {
            if (!(col & 7) && col + 8 <= W && !word8(pend + col)) { col += 7; continue; }
            if (!pend[col]) continue;
            float key;
            if (!c->policy_ms) key = uniform_at(h_key, b, col);
            else if (c->is_input[col] && c->input_random) {
                /* above every float key (+inf maps to 0x7F800000), by the order key */
                cand[m++] = (int64_t)(((uint64_t)(0x7F800000 + order_key_at(h_order, b, col)) << 32)
                                      | (uint64_t)(W - 1 - col));
                continue;
            }
            else if (c->is_input[col]) key = INFINITY;
            else {
                key = (float)pre[col];
                if (c->noise > 0) key = key + noise * uniform_at(h_key, b, col);
            }
            cand[m++] = packed_key(key, col, W);
        }
        const int64_t n = m < K ? m : K;
        top_n(cand, m, n);
        qsort(cand, (size_t)n, sizeof(int64_t), cmp_desc);
        for (int64_t j = 0; j < K; j++)
            s[j] = (int32_t)(j < n ? W - 1 - (int64_t)((uint64_t)cand[j] & 0xFFFFFFFFu) : dump);
        if (c->fill && n < K) {  /* fill_slots: the free slots take the best fillers */
            const uint8_t *fl = c->fillable + b * W;
            const SCALAR *vb_ = (const SCALAR *)c->v + b * W;
            int64_t mf = 0;
            for (int64_t col = 0; col < W; col++) {
                if (!(col & 7) && col + 8 <= W && !word8(fl + col)) { col += 7; continue; }
                if (!fl[col] || pend[col]) continue;
                const float key = c->policy_ms ? (float)vb_[col] : uniform_at(h_fill, b, col);
                cand[mf++] = packed_key(key, col, W);
            }
            const int64_t nf = mf < K - n ? mf : K - n;
            top_n(cand, mf, nf);
            qsort(cand, (size_t)nf, sizeof(int64_t), cmp_desc);
            for (int64_t j = 0; j < nf; j++)
                s[n + j] = (int32_t)(-1 - (W - 1 - (int64_t)((uint64_t)cand[j] & 0xFFFFFFFFu)));
        }
        for (int64_t j = 0; j < K; j++)
            sd[j] = (c->p_net > 0 && uniform_at(h_drop, b, DEC(s[j])) < p_net) ? (int32_t)dump : s[j];
        for (int64_t j = 0; j < K; j++) if (s[j] >= 0) pend[s[j]] = 0;
        if (c->fill) for (int64_t j = 0; j < K; j++) c->fillable[b * W + DEC(s[j])] = 0;
        const int out_any = FN(evaluate)(c, b, h_ref, s, sd, vb, cur, cnt, NULL, NULL, 1);
        c->steps[b] += 1;
        if (c->eager_first && c->first_out[b] < 0 && out_any) c->first_out[b] = c->steps[b];
        out_fired[b] = (uint8_t)out_any;
    }
    int all_done = 1;
    for (int64_t b = 0; b < B; b++) {
        if (!c->done[b]) {
            const uint8_t *pend = c->pending + b * W;
            int any = 0;
            int64_t col = 0;
            for (; col + 8 <= W && !any; col += 8) any = word8(pend + col) != 0;
            for (; col < W && !any; col++) any = pend[col];
            int d = !any || c->steps[b] >= c->max_steps;
            if (c->stop_output && c->first_out[b] >= 0 && c->steps[b] >= c->first_out[b] + c->steps_after_output)
                d = 1;
            c->done[b] = (uint8_t)d;
        }
        all_done &= c->done[b];
    }
    return all_done;
}

/* Up to n_max forward steps (k = k0, k0 + 1, ...), stopping after the step that
 * leaves every sample done. Step i writes sel + i B K, ..., out_fired + i B.
 * Returns the number of steps taken (>= 1; the caller checks `done` first). */
int64_t FN(at_forward_steps)(const Ctx *c, int64_t t, int64_t k0, int64_t n_max, int32_t *sel,
                             int32_t *sel_deliv, SCALAR *vals, uint8_t *out_fired, SCALAR *cur,
                             int64_t *cand) {
    const int64_t BK = c->B * c->K;
    for (int64_t i = 0; i < n_max; i++)
        if (FN(at_forward_step)(c, t, k0 + i, sel + i * BK, sel_deliv + i * BK, vals + i * BK,
                                out_fired + i * c->B, cur, cand))
            return i + 1;
    return n_max;
}

/* Replay a recorded step (the backward's recompute): deliver the recorded selection,
 * evaluate, and write what the backward sweep needs: vals [B, K], v_pre [B, W] and the
 * flags [B, W] (refractory before the step, received, gate: `evaluate`). */
void FN(at_replay_step)(const Ctx *c, int64_t t, int64_t k, const int32_t *sel,
                        const int32_t *sel_deliv, SCALAR *vals, SCALAR *v_pre, uint8_t *flags, SCALAR *cur) {
    const int64_t B = c->B, W = c->W, K = c->K;
    const uint32_t h_ref = counter_hash(c->seed, STREAM_REFRACTORY_DROPOUT, (uint32_t)t, (uint32_t)k);
    int32_t cnt[2 * c->n_slots];
    for (int64_t b = 0; b < B; b++)
        FN(evaluate)(c, b, h_ref, sel + b * K, sel_deliv + b * K, vals + b * K, cur, cnt,
                     v_pre + b * W, flags + b * W, 0);
}

/* The reverse of one step (the backward sweep of asynctrain/loop.py, SPEC 8): from
 * the adjoints g_v, g_o (in place, [B, W]) and g_acc ([B, n_out]) after the step to
 * those before it; adds the step's weight-table gradient into grad_wt [W, F].
 * Scratch: gcur [W] SCALAR. armed (uint8 [B, W] in place, or NULL):
 * surrogate_at="fire_or_last": a receiver's surrogate counts only where it fired or
 * armed is set (its window's last evaluation); every receiver clears it, the step's
 * emptied outboxes set it. */
void FN(at_backward_step)(const Ctx *c, const int32_t *sel, const int32_t *sel_deliv,
                          const SCALAR *vals, const SCALAR *v_pre, const uint8_t *flags, SCALAR *g_v,
                          SCALAR *g_o, const SCALAR *g_acc, SCALAR *grad_wt, SCALAR *gcur, uint8_t *armed) {
    const int64_t B = c->B, W = c->W, K = c->K, F = c->F, n_out = c->out_hi - c->out_lo;
    const SCALAR *wt = (const SCALAR *)c->wt, *theta = (const SCALAR *)c->theta;
    const SCALAR half_alpha = (SCALAR)(c->alpha / 2), scale = (SCALAR)(M_PI / 2 * c->alpha);
    int32_t cnt[c->n_slots];
    for (int64_t b = 0; b < B; b++) {
        SCALAR *gv = g_v + b * W, *go = g_o + b * W;
        const SCALAR *ga = g_acc + b * n_out, *vp_b = v_pre + b * W;
        const uint8_t *fl = flags + b * W;
        const int32_t *s = sel + b * K, *sd = sel_deliv + b * K;
        uint8_t *arm = armed ? armed + b * W : NULL;
        memset(cnt, 0, sizeof(int32_t) * c->n_slots);
        for (int64_t j = 0; j < K; j++) cnt[c->source_slot[DEC(sd[j])]]++;  /* fillers included */
        for (int64_t l = 0; l < c->n_slots; l++) {
          if (!cnt[l]) continue;
          for (int64_t col = c->slot_lo[l]; col < c->slot_hi[l]; col++) {
            if (!(fl[col] & RECEIVED)) { gcur[col] = 0; continue; }
            const int gt = (fl[col] & GATE) != 0;
            SCALAR gs = go[col] * (c->is_source[col] ? (SCALAR)1 : (SCALAR)0);
            if (col >= c->out_lo && col < c->out_hi) gs = gs + ga[col - c->out_lo];
            const SCALAR vp = vp_b[col], th = theta[col];
            const SCALAR s = (gt && vp >= th) ? (SCALAR)1 : (SCALAR)0;
            SCALAR dsdv = 0;
            const int counts = !arm || s > 0 || arm[col];
            if (arm) arm[col] = 0;
            if (gt && counts) {
                const SCALAR y = scale * (vp - th), den = 1 + y * y;
                dsdv = ((SCALAR)1 / den) * half_alpha;
            }
            const SCALAR gvn = gv[col];
            SCALAR gp = gvn * (1 - s);
            if (!c->detach_reset) gp = gp - gvn * vp * dsdv;
            gp = gp + gs * dsdv;
            if (fl[col] & REFR_BEFORE) gp = 0;
            gcur[col] = gp;
            gv[col] = gp;
          }
        }
        const SCALAR *x = vals + b * K;
        SCALAR gvals[K];
        for (int64_t j = 0; j < K; j++) {  /* padding entries: zero weight, zero adjoint */
            const int64_t src = DEC(sd[j]), l = c->source_slot[src], lo = c->slot_lo[l], n = c->slot_hi[l] - lo;
            const SCALAR *w = wt + src * F, *g = gcur + lo, xj = x[j];
            SCALAR *gw = grad_wt + src * F, a = 0;
            for (int64_t f = 0; f < n; f++) a += g[f] * w[f];
            for (int64_t f = 0; f < n; f++) gw[f] += g[f] * xj;
            gvals[j] = a;
        }
        for (int64_t j = 0; j < K; j++) go[DEC(s[j])] = 0;
        for (int64_t j = 0; j < K; j++) go[DEC(sd[j])] += gvals[j];
        if (arm)
            for (int64_t j = 0; j < K; j++) arm[DEC(s[j])] = 1;
    }
}

#undef FN
#undef CAT
#undef CAT_
