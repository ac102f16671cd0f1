"""The Triton kernels of kiln's decode path, in a module of their own because it imports Triton, which only
CUDA machines need (`attention.py` and `matvec.py` import it lazily). Triton's interpreter (TRITON_INTERPRET=1
when this module is loaded) runs them on a CPU for the tests.

- `decode_kernel`, `combine_kernel`: `kiln.infer.attention.decode_attention`. Program (b, h, j): row b, query
  head h (key/value head h // G), split j of the cached keys (`chunk` each). With MERGE, the head's splits
  count themselves in on an int32 counter (`count_ptr[b * H + h]`, zero between launches) after writing their
  partial results, and the one that arrives last merges them and sets the counter back to zero: the merge
  costs no launch. The counter's add is acquire-release at GPU scope after a barrier of the program's
  threads, so the last program sees every other split's partial results; without MERGE, `combine_kernel`.
- `matvec_kernel`: `kiln.infer.matvec.matvec`. Program n: a block of BLOCK_N outputs for every row.

With PDL (constexpr; launched with `launch_pdl=True`, kiln.runtime.device.programmatic_launch) a kernel may
start while the one before it in the stream still runs: it first does what does not depend on that kernel
(matvec: load its first block of weights), then waits for it to finish (`gdc_wait`: its writes visible), and
only then lets the next kernel launch (`gdc_launch_dependents`), so at most two kernels overlap and every
kernel's input is complete before it is read. The interpreter has no such instructions: PDL=False there.
"""

import triton
import triton.language as tl

try:   # programmatic dependent launch (Triton 3.3+); kernels use it only with PDL=True (Hopper or newer)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def decode_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, acc_ptr, ml_ptr,
                  count_ptr, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_n, sc_k, sc_m, chunk, scale,
                  G: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK: tl.constexpr,
                  SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, MERGE: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # q, k, v come from the kernel before
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.program_id(2)
    kh = h // G
    pos = tl.load(pos_ptr + b)
    e = tl.arange(0, E_POW2)
    in_e = e < E
    half = E // 2
    e_rot = tl.where(e < half, e + half, e - half)        # rotate_half: pairs i and i + E/2
    sign = tl.where(e < half, -1.0, 1.0)
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + b * E + e, mask=in_e, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(sin_ptr + b * E + e, mask=in_e, other=0.0).to(dt).to(tl.float32)

    q_row = q_ptr + b * sq_b + h * sq_h
    q = tl.load(q_row + e, mask=in_e, other=0.0).to(tl.float32)
    q_r = tl.load(q_row + e_rot, mask=in_e, other=0.0).to(tl.float32)
    q = (q * cos + sign * q_r * sin).to(dt).to(tl.float32) * scale
    k_row = k_ptr + b * sk_b + kh * sk_h
    k_new = tl.load(k_row + e, mask=in_e, other=0.0).to(tl.float32)
    k_r = tl.load(k_row + e_rot, mask=in_e, other=0.0).to(tl.float32)
    k_new = (k_new * cos + sign * k_r * sin).to(kc_ptr.dtype.element_ty)
    v_new = tl.load(v_ptr + b * sv_b + kh * sv_h + e, mask=in_e, other=0.0).to(vc_ptr.dtype.element_ty)
    cache_kh = b * sc_n + kh * sc_k
    if (j == 0) & (h % G == 0):
        tl.store(kc_ptr + cache_kh + pos * sc_m + e, k_new, mask=in_e)
        tl.store(vc_ptr + cache_kh + pos * sc_m + e, v_new, mask=in_e)

    # The new key seeds split 0's running (max, sum, values); the other splits start empty, with a finite
    # max (-1e30, not -inf) so that exp(max - max) = 1 times a zero sum never makes a NaN.
    first = j == 0
    s_new = tl.sum(q * k_new.to(tl.float32), 0)
    m = tl.where(first, s_new, -1e30)
    l_sum = tl.where(first, 1.0, 0.0)
    acc = v_new.to(tl.float32) * l_sum
    start = j * chunk
    end = tl.minimum(start + chunk, pos)                   # cached keys only: 0 .. pos - 1
    s_off = tl.arange(0, BLOCK)
    for i in range(0, chunk, BLOCK):    # bounds known at launch; blocks past `end` load nothing
        s_idx = start + i + s_off
        seen = s_idx < end
        ptrs = cache_kh + s_idx[:, None].to(tl.int64) * sc_m + e[None, :]
        both = seen[:, None] & in_e[None, :]
        kb = tl.load(kc_ptr + ptrs, mask=both, other=0.0).to(tl.float32)
        vb = tl.load(vc_ptr + ptrs, mask=both, other=0.0).to(tl.float32)   # issued with the keys' load
        s = tl.where(seen, tl.sum(kb * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vb, 0)
        m = m_new
    if SPLITS == 1:
        tl.store(out_ptr + (b * tl.num_programs(1) + h) * E + e, (acc / l_sum).to(dt), mask=in_e)
    else:
        r = b * tl.num_programs(1) + h
        part = r * SPLITS + j
        tl.store(acc_ptr + part * E + e, acc, mask=in_e)
        tl.store(ml_ptr + part * 2, m)
        tl.store(ml_ptr + part * 2 + 1, l_sum)
        if MERGE:   # the head's last split to finish merges, instead of a second launch (see the module docstring)
            tl.debug_barrier()   # every thread's stores before the release below
            arrived = tl.atomic_add(count_ptr + r, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                _merge(acc_ptr, ml_ptr, out_ptr, r, E, E_POW2, SPLITS, SPLITS_POW2)
                tl.store(count_ptr + r, 0)   # zero again for the next launch



@triton.jit
def _merge(acc_ptr, ml_ptr, out_ptr, r, E: tl.constexpr, E_POW2: tl.constexpr, SPLITS: tl.constexpr,
           SPLITS_POW2: tl.constexpr):
    """Merge row-head r's SPLITS partial (max, sum, weighted values) into its output row. The loads bypass L1
    (.cg): in the in-kernel merge other programs wrote them during this kernel."""
    jj = tl.arange(0, SPLITS_POW2)
    e = tl.arange(0, E_POW2)
    in_j = jj < SPLITS
    part = r * SPLITS + jj
    m = tl.load(ml_ptr + part * 2, mask=in_j, other=-1e30, cache_modifier=".cg")   # an empty split: weight 0
    l_sum = tl.load(ml_ptr + part * 2 + 1, mask=in_j, other=0.0, cache_modifier=".cg")
    w = tl.exp(m - tl.max(m, 0))
    acc = tl.load(acc_ptr + part[:, None] * E + e[None, :], mask=in_j[:, None] & (e[None, :] < E), other=0.0,
                  cache_modifier=".cg")
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_sum * w, 0)
    tl.store(out_ptr + r * E + e, out.to(out_ptr.dtype.element_ty), mask=e < E)


@triton.jit
def combine_kernel(acc_ptr, ml_ptr, out_ptr, E: tl.constexpr, E_POW2: tl.constexpr, SPLITS: tl.constexpr,
                   SPLITS_POW2: tl.constexpr, PDL: tl.constexpr):
    """Program r = b * H + h: the merge as a launch of its own (decode_kernel's MERGE=False)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    _merge(acc_ptr, ml_ptr, out_ptr, tl.program_id(0).to(tl.int64), E, E_POW2, SPLITS, SPLITS_POW2)


@triton.jit
def _product(xb, wb, acc, IEEE: tl.constexpr, DOT: tl.constexpr):
    """acc + xb (rows, BLOCK_K) @ wb (BLOCK_K, BLOCK_N) in fp32: tl.dot (rows padded to 16, BLOCK_N >= 16), or
    products summed on the CUDA cores (any power-of-two sizes)."""
    if DOT:
        if IEEE:   # fp32 weights: exact fp32 products, not TF32
            out = tl.dot(xb, wb, acc, input_precision="ieee")
        else:
            out = tl.dot(xb, wb, acc)
    else:
        out = acc + tl.sum(xb.to(tl.float32)[:, :, None] * wb.to(tl.float32)[None, :, :], 1)
    return out


@triton.jit
def matvec_kernel(x_ptr, w_ptr, out_ptr, g_ptr, res_ptr, B, N, K, sx_b, eps,
                  B_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
                  DOT: tl.constexpr, PDL: tl.constexpr):
    """out (B, N) = [silu(.) * of the two halves] (rms_norm(x) * g if NORM else x) @ W^T [+ res].

    W is (N, K), or (2N, K) with GLU (gate rows, then up rows). Every program reads all B rows of x (a few KB,
    from L2) and its BLOCK_N rows of W once; with DOT the rows are padded to 16 for tl.dot."""
    n0 = tl.program_id(0) * BLOCK_N
    rows = tl.arange(0, B_POW2)
    cols = n0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    in_b = rows < B
    in_n = cols < N
    dt = w_ptr.dtype.element_ty
    if PDL:   # the first block of weights is in flight while the kernel before (which writes x) finishes
        w_ptrs0 = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]   # (BLOCK_K, BLOCK_N): W^T's first block
        w_mask0 = (ks < K)[:, None] & in_n[None, :]
        wb0 = tl.load(w_ptrs0, mask=w_mask0, other=0.0)
        wu0 = wb0
        if GLU:
            wu0 = tl.load(w_ptrs0 + N * K, mask=w_mask0, other=0.0)
        gdc_wait()
        gdc_launch_dependents()
    rstd = tl.full([B_POW2], 1.0, tl.float32)
    if NORM:
        ss = tl.zeros([B_POW2], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            xb = tl.load(x_ptr + rows[:, None] * sx_b + kk[None, :], mask=in_b[:, None] & (kk[None, :] < K),
                         other=0.0).to(tl.float32)
            ss += tl.sum(xb * xb, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([B_POW2, BLOCK_N], tl.float32)
    acc_up = tl.zeros([B_POW2, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        in_k = kk < K
        xb = tl.load(x_ptr + rows[:, None] * sx_b + kk[None, :], mask=in_b[:, None] & in_k[None, :],
                     other=0.0).to(tl.float32)
        if NORM:   # the model's RMSNorm: fp32, the gain applied, rounded once to the weights' dtype
            gain = tl.load(g_ptr + kk, mask=in_k, other=0.0).to(tl.float32)
            xb = xb * rstd[:, None] * gain[None, :]
        xb = xb.to(dt)
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * K + kk[:, None]   # (BLOCK_K, BLOCK_N): W^T's block
        if PDL:
            if k0 == 0:
                wb = wb0
            else:
                wb = tl.load(w_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        else:
            wb = tl.load(w_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = _product(xb, wb, acc, IEEE, DOT)
        if GLU:
            if PDL:
                if k0 == 0:
                    wu = wu0
                else:
                    wu = tl.load(w_ptrs + N * K, mask=in_k[:, None] & in_n[None, :], other=0.0)
            else:
                wu = tl.load(w_ptrs + N * K, mask=in_k[:, None] & in_n[None, :], other=0.0)
            acc_up = _product(xb, wu, acc_up, IEEE, DOT)
    y = acc.to(dt).to(tl.float32)      # each matmul's output rounded, as the model's are
    if GLU:
        up = acc_up.to(dt).to(tl.float32)
        y = (y / (1.0 + tl.exp(-y))) * up
    if RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=in_b[:, None] & in_n[None, :], other=0.0)
        y = y.to(dt).to(tl.float32) + res.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=in_b[:, None] & in_n[None, :])
