"""``benchmarks.kernels.inspect``'s reading of a kernel's TTGIR: its matrix
products, their layouts, and how many times a layout computes each element."""
import pytest

from benchmarks.kernels.inspect import CompileReport, Product, products_of

TTGIR = '''#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 16, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 64, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 8]}>
      %a = ttng.warp_group_dot %x, %w, %c {isAsync = true} : tensor<64x128xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * !ttg.memdesc<128x32xbf16, #shared, #smem> -> tensor<64x32xf32, #mma> loc(#loc1)
      %b = ttng.warp_group_dot %a2, %w2, %acc {isAsync = true} : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * !ttg.memdesc<32x128xbf16, #shared1, #smem> -> tensor<64x128xf32, #mma1> loc(#loc2)
      %c = tt.dot %p, %q, %r : tensor<32x16xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma2, kWidth = 2}>> * tensor<16x128xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma2, kWidth = 2}>> -> tensor<32x128xf32, #mma2> loc(#loc3)
'''


def test_products_are_read_with_their_layouts_and_the_copies_they_compute():
    found = products_of(TTGIR)
    assert found == [Product(64, 32, 3, (8, 1), (16, 16, 16)),
                     Product(64, 128, 3, (4, 2), (16, 64, 16)),
                     Product(32, 128, 2, (4, 2), (16, 8))]
    # 8 warps x 16 rows over 64 rows: twice; 4 x 16 rows over 32: twice
    assert [p.copies for p in found] == [2, 1, 2]
    assert str(found[0]) == '64x32 on wgmma n16, warps [8, 1], 2 copies'
    assert str(found[1]) == '64x128 on wgmma n64, warps [4, 2]'
    # columns too: 2 warps x 64 columns over a 64-column result
    assert Product(64, 64, 3, (4, 2), (16, 64, 16)).copies == 2


def test_a_report_counts_the_products_computed_more_than_once():
    found = tuple(products_of(TTGIR))
    report = CompileReport('k', 90, 168, 0, 0, 49152, 8, 2, 18, 0, found)
    assert str(report).endswith('; 2 of 3 products computed more than once')
    alone = CompileReport('k', 90, 168, 0, 0, 49152, 8, 2, 18, 0, found[1:2])
    assert 'more than once' not in str(alone)


def test_a_batched_product_is_left_out_and_an_unread_layout_is_an_error():
    batched = TTGIR.replace('-> tensor<64x32xf32, #mma>', '-> tensor<2x64x32xf32, #mma>')
    assert [(p.rows, p.cols) for p in products_of(batched)] == [(64, 128), (32, 128)]
    renamed = TTGIR.replace('#mma2 = #ttg.nvidia_mma<{versionMajor = 2,',
                            '#mma2 = #ttg.nvidia_mma<{versionMajor = 2, cgaLayout = [1],')
    with pytest.raises(ValueError, match="laid out as \\['#mma2'\\]"):
        products_of(renamed)
