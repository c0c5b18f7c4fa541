//! Intel AMX tiles for the int8 linear layers (`Int8Kernel::Amx`).
//! `tdpbusd` multiplies a 16 × 64 tile of u8 activation codes by a 64 × 16
//! tile of i8 weights into 16 × 16 i32 sums: 16,384 multiply-adds per
//! instruction against VNNI's 64 (`vpdpbusd`). The weights' packed panels
//! (`[kq/4][16][4]` per 16 channels) are already AMX's B-tile layout: 16
//! rows of 64 bytes per 64 inputs. The integers are the other kernels', so
//! the answers are bit for bit the same.
//!
//! Written with inline assembly because Rust's AMX intrinsics and target
//! features are unstable (rust-lang/rust#126622); the instructions assemble
//! without them. CPU support comes from CPUID (leaf 7: AMX-TILE, AMX-INT8)
//! and OS support from Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM)`, which a
//! process must call before its first tile instruction.

use std::arch::asm;
use std::sync::OnceLock;

use super::{AMX_ROWS as ROWS, AMX_STEP as STEP, PANEL};

/// Whether this CPU and OS run AMX int8 tiles, decided once (the first
/// call asks Linux for the tile state).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx_int8() && os_grants_tiles())
}

fn cpu_has_amx_int8() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    // Bit 24: AMX-TILE, bit 25: AMX-INT8.
    edx & (1 << 24) != 0 && edx & (1 << 25) != 0
}

#[cfg(target_os = "linux")]
fn os_grants_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only asks the kernel to
    // enable a state component for this process; it reads no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn os_grants_tiles() -> bool {
    false
}

/// The tile configuration: palette 1; tmm0–3 the four 16 × 16 i32 sums,
/// tmm4–5 two 16-row A tiles, tmm6–7 two 16-row B tiles, all 64 bytes wide.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // colsb, u16 little endian
        c[48 + t] = 16; // rows
        t += 1;
    }
    Config(c)
};

/// The tile registers configured on this thread, for as long as it lives
/// (`ldtilecfg` once per block of tiles rather than per tile; released
/// on drop).
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Loads the configuration.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn configure() -> Tiles {
        // SAFETY: AMX is available (the caller's promise); CONFIG is a
        // valid palette-1 configuration, 64-byte aligned.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const Config, options(nostack, readonly));
        }
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure` ran on this
        // thread (it is neither Send nor Sync: see the marker below).
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }
}

/// `acc[(r·np + p)·16 + j] = Σₖ a[r][k] · b_p[j][k]` for the 32 rows of `a`
/// and `np` (1 or 2) panels of `b`, on the tiles `_tiles` configured.
///
/// # Safety
/// `_tiles` must have been configured on this thread; `a.len() == 32·kq`,
/// `b.len() == np·16·kq`, `acc.len() == 32·np·16`, `kq` a multiple of 64
/// and `np` 1 or 2.
pub unsafe fn tile(_tiles: &Tiles, a: &[u8], b: &[i8], np: usize, kq: usize, acc: &mut [i32]) {
    debug_assert!(
        a.len() == ROWS * kq
            && b.len() == np * PANEL * kq
            && acc.len() == ROWS * np * PANEL
            && kq.is_multiple_of(STEP)
            && (np == 1 || np == 2)
    );
    let panel = PANEL * kq;
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    // Row strides: A rows are kq codes apart, B rows 64 bytes, sums
    // np·16 i32.
    let (sa, sb, sc) = (kq, PANEL * 4, np * PANEL * 4);
    // SAFETY: the caller guarantees AMX and the sizes. Every tile load
    // reads 16 rows of 64 bytes: A tile h at rows 16h.. of `a`, bytes
    // k0..k0 + 64 < kq; B tile p at panel p's groups k0/4 .. k0/4 + 16,
    // 1,024 contiguous bytes inside the panel. Every store writes 16 rows
    // of 16 i32 inside `acc`. No tile register is live across calls: the
    // sums are zeroed first and stored last.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for k0 in (0..kq).step_by(STEP) {
            let a0 = ap.add(k0);
            let a1 = ap.add(16 * kq + k0);
            let b0 = bp.add(k0 / 4 * PANEL * 4);
            // The first product starts after two loads, the second A tile
            // loading meanwhile (`cargo bench --bench int8`-style A/B, min of
            // 21 alternations, 1 thread, AMX Xeon: 2-4% less time at 160 rows
            // than with both A tiles loaded first).
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbusd tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbusd tmm2, tmm5, tmm6",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                sa = in(reg) sa,
                sb = in(reg) sb,
                options(nostack, readonly)
            );
            if np == 2 {
                let b1 = bp.add(panel + k0 / 4 * PANEL * 4);
                asm!(
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tdpbusd tmm3, tmm5, tmm7",
                    b1 = in(reg) b1,
                    sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
        }
        let c = acc.as_mut_ptr();
        // Sum tile (h, p) starts at row 16h, panel p: acc[(16h·np + p)·16].
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c2} + {sc}*1], tmm2",
            c0 = in(reg) c,
            c2 = in(reg) c.add(16 * np * PANEL),
            sc = in(reg) sc,
            options(nostack)
        );
        if np == 2 {
            asm!(
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c3} + {sc}*1], tmm3",
                c1 = in(reg) c.add(PANEL),
                c3 = in(reg) c.add(16 * np * PANEL + PANEL),
                sc = in(reg) sc,
                options(nostack)
            );
        }
    }
}
