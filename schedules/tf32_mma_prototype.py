"""Prototype: TF32 m16n8k8 PTX mma intrinsics (two n8 halves per 16x16 accumulator tile)."""
from tvm.script import tirx as T
from tvm.s_tir import TensorIntrin

WARP = 32


def a_map(i, k):  # A tile [16 co][8 k] -> (thread, local)
    return (i % 8) * 4 + k % 4, i // 8 + 2 * (k // 4)


def b_map(n, k):  # B tile stored [16 n][8 k] -> (thread, local); two n8 halves
    return (n % 8) * 4 + k % 4, (n // 8) * 2 + k // 4


def a_rev(t, l):
    return t // 4 + 8 * (l % 2), t % 4 + 4 * (l // 2)


def b_rev(t, l):
    return t // 4 + 8 * (l // 2), t % 4 + 4 * (l % 2)


def load_intrin(is_b, scope="shared.dyn"):
    fmap, rev = (b_map, b_rev) if is_b else (a_map, a_rev)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 8), "float32", align=64, offset_factor=8, scope=scope)
        C = T.match_buffer(c, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:16, 0:8])
            T.writes(C[0:WARP, 0:4])
            for i, k in T.grid(16, 8):
                with T.sblock("load"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    t, l = T.meta_var(fmap(vi, vk))
                    T.reads(A[vi, vk])
                    T.writes(C[t, l])
                    C[t, l] = A[vi, vk]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        A = T.match_buffer(a, (16, 8), "float32", align=64, offset_factor=8, scope=scope, strides=[s0, s1])
        C = T.match_buffer(c, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:16, 0:8])
            T.writes(C[0:WARP, 0:4])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for l in T.unroll(4):
                    r, k = T.meta_var(rev(tx, l))
                    C[tx, l] = A[r, k]

    return desc, impl


def sync_intrin():
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        B = T.match_buffer(b, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:4], B[0:WARP, 0:4])
            T.writes(C[0:WARP, 0:8])
            for i, j, k in T.grid(16, 16, 8):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(((vi % 8) * 4 + (vj % 8) // 2, 4 * (vj // 8) + (vi // 8) * 2 + vj % 2))
                    ta, la = T.meta_var(a_map(vi, vk))
                    tb, lb = T.meta_var(b_map(vj, vk))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] = C[tc, lc] + A[ta, la] * B[tb, lb]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        B = T.match_buffer(b, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:4], B[0:WARP, 0:4])
            T.writes(C[0:WARP, 0:8])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.mma("m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                                            A.data, A.elem_offset + tx * 4, B.data, B.elem_offset + tx * 4,
                                            C.data, C.elem_offset + tx * 8, False, dtype="float32"))
                T.evaluate(T.ptx_legacy.mma("m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                                            A.data, A.elem_offset + tx * 4, B.data, B.elem_offset + tx * 4 + 2,
                                            C.data, C.elem_offset + tx * 8 + 4, False, dtype="float32"))

    return desc, impl


NAMES = ("deft_tf32_load_a", "deft_tf32_load_b", "deft_tf32_sync")


def register():
    try:
        TensorIntrin.get(NAMES[0])
        return NAMES
    except Exception:
        pass
    TensorIntrin.register(NAMES[0], *load_intrin(False))
    TensorIntrin.register(NAMES[1], *load_intrin(True))
    TensorIntrin.register(NAMES[2], *sync_intrin())
    return NAMES


def apply_tf32(sch, tiles):
    from tvm.s_tir.tensor_intrin import cuda as intrinsics
    from deft_tvm.compute import STAGE_CONV, STAGE_OUTPUT, STAGE_SAMPLED, STAGE_WEIGHT
    from deft_tvm.schedules.cuda_tensorcore import _flat_position, _gather_channels_vectorised, _cooperative
    load_a, load_b, sync = register()
    FR, K = 16, 8
    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)
    flat = _flat_position(sch)
    sch.compute_inline(sch.get_sblock(STAGE_WEIGHT))
    sampled_shared = sch.cache_read(conv, 1, "shared.dyn")
    weight_shared = sch.cache_read(conv, 0, "shared.dyn")
    sampled_frag = sch.cache_read(conv, 1, "warp")
    weight_frag = sch.cache_read(conv, 0, "warp")
    sch.set_scope(conv, 0, "warp")
    conv_shared = sch.cache_read(output, 0, "shared.dyn")
    for block in (sampled_shared, sampled_frag):
        sch.transform_layout(block, ("write", 0), lambda n, c, ky, kx, oy, ox: (ky, kx, flat(n, oy, ox), c))
        sch.transform_block_layout(block, lambda n, c, ky, kx, oy, ox: (ky, kx, flat(n, oy, ox), c))
    sch.transform_layout(weight_shared, ("write", 0), lambda co, ky, kx, rc: (ky, kx, co, rc))
    sch.transform_layout(weight_frag, ("write", 0), lambda co, ky, kx, rc: (ky, kx, co, rc))
    for block in (conv, conv_shared):
        sch.transform_layout(block, ("write", 0), lambda n, co, oy, ox: (co, flat(n, oy, ox)))
    sch.transform_block_layout(conv, lambda n, co, oy, ox, rc, ky, kx: (co, flat(n, oy, ox), ky, kx, rc))
    sch.transform_block_layout(conv_shared, lambda n, co, oy, ox: (co, flat(n, oy, ox)))
    sch.transform_block_layout(output, lambda n, co, oy, ox: (co, flat(n, oy, ox)))
    # warp-register layouts of the fragments
    sch.transform_layout(weight_frag, ("write", 0), lambda ky, kx, co, rc: (ky, kx, co // 16, rc // 8, *a_map(co % 16, rc % 8)))
    sch.transform_layout(sampled_frag, ("write", 0), lambda ky, kx, p, c: (ky, kx, p // 16, c // 8, *b_map(p % 16, c % 8)))
    sch.transform_layout(conv, ("write", 0), lambda co, p: (co // 16, p // 16, (co % 8) * 4 + (p % 8) // 2, 4 * (p % 16 // 8) + (co % 16 // 8) * 2 + p % 2))

    co, p, ky, kx, rc = sch.get_loops(conv)
    co, co_i = sch.split(co, [None, FR])
    p, p_i = sch.split(p, [None, FR])
    rc, rc_i = sch.split(rc, [None, K])
    co_frag_factors, p_frag_factors = tiles.co(sch, co), tiles.p(sch, p)
    co, co_f = sch.split(co, co_frag_factors)
    p, p_f = sch.split(p, p_frag_factors)
    co_factors, p_factors = tiles.co_warps(sch, co), tiles.p_warps(sch, p)
    co_b, co_w = sch.split(co, co_factors)
    p_b, p_w = sch.split(p, p_factors)
    warps_co, warps_p = co_factors[1], p_factors[1]
    rc_o, rc_f = sch.split(rc, tiles.rc(sch, rc))
    sch.reorder(co_b, p_b, co_w, p_w, ky, kx, rc_o, rc_f, co_f, p_f, co_i, p_i, rc_i)
    sch.bind(sch.fuse(co_b, p_b), "blockIdx.x")
    warp = sch.fuse(co_w, p_w)
    sch.bind(warp, "threadIdx.y")

    sch.reverse_compute_at(conv_shared, warp, preserve_unit_loops=True)
    store_co, store_p = sch.get_loops(conv_shared)[-2:]
    store_co_f, store_co_i = sch.split(store_co, [None, FR])
    store_p_f, store_p_i = sch.split(store_p, [None, FR])
    sch.reorder(store_co_f, store_p_f, store_co_i, store_p_i)
    sch.reverse_compute_at(output, store_p_f, preserve_unit_loops=True)
    out_lane = sch.fuse(*sch.get_loops(output)[-2:])
    _, lane = sch.split(out_lane, [None, WARP])
    sch.bind(lane, "threadIdx.x")

    sch.compute_at(sampled_frag, rc_f, preserve_unit_loops=True)
    sch.compute_at(weight_frag, rc_f, preserve_unit_loops=True)
    sch.compute_at(sampled_shared, rc_o, preserve_unit_loops=True)
    sch.compute_inline(sch.get_sblock(STAGE_SAMPLED))
    _gather_channels_vectorised(sch, sampled_shared, tiles.vector(sch), warps_co, warps_p)
    sch.compute_at(weight_shared, rc_o, preserve_unit_loops=True)
    w_co, w_ky, w_kx, w_rc = sch.get_loops(weight_shared)[-4:]
    w_rc, w_vec = sch.split(w_rc, [None, 4])
    _cooperative(sch, [w_co, w_ky, w_kx, w_rc], warps_co, warps_p)
    sch.vectorize(w_vec)

    b_p, b_c = sch.get_loops(sampled_frag)[-2:]
    b_p_f, b_p_i = sch.split(b_p, [None, FR])
    sch.reorder(b_p_f, b_p_i, b_c)
    sch.tensorize(b_p_i, load_b)
    a_co, a_ky, a_kx, a_rc = sch.get_loops(weight_frag)[-4:]
    a_co_f, a_co_i = sch.split(a_co, [None, FR])
    sch.reorder(a_ky, a_kx, a_co_f, a_co_i, a_rc)
    sch.tensorize(a_co_i, load_a)
    sch.tensorize(store_co_i, intrinsics.MMA_store_16x16_f32_shared_dyn_INTRIN)
    init = sch.decompose_reduction(conv, ky)
    init_co_i = sch.get_loops(init)[-2]
    sch.tensorize(init_co_i, intrinsics.MMA_fill_16x16_f32_INTRIN)
    sch.tensorize(co_i, sync)
