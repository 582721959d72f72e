//! Byte-wise atomic copies (the semantics of Rust RFC 3301, `atomic_memcpy`): every byte of a
//! shared mapping is read and written with relaxed atomic operations — a machine word at a time
//! where the shared side is aligned, a byte at a time at the ends. Concurrent DMA to the same
//! bytes (the user's race, as on hardware) is then a race on values, never undefined behaviour:
//! safe code holding a `&Memory` on two threads cannot make the program unsound.
//!
//! The private side (a `&[u8]` / `&mut [u8]` of the caller) is accessed plainly.
//!
//! # Safety (all functions)
//! The shared pointers must be valid for the whole length and only ever be accessed through
//! these functions (or by other processes and devices) while the mapping lives.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};

const W: usize = std::mem::size_of::<usize>();

/// Bytes from `p` up to the next word boundary (at most `len`).
fn head(p: usize, len: usize) -> usize {
    (p.next_multiple_of(W) - p).min(len)
}

/// Copy `dst.len()` bytes out of shared memory at `src`.
///
/// # Safety
/// See the module docs.
pub(super) unsafe fn load(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let h = head(src as usize, len);
    let mut i = 0;
    while i < h {
        // SAFETY: `src + i` is in the shared range; any alignment is fine for a byte.
        dst[i] = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Relaxed);
        i += 1;
    }
    while i + W <= len {
        // SAFETY: `src + i` is word-aligned (past the head) and in range.
        let v = unsafe { AtomicUsize::from_ptr(src.add(i).cast_mut().cast()) }.load(Relaxed);
        dst[i..i + W].copy_from_slice(&v.to_ne_bytes());
        i += W;
    }
    while i < len {
        // SAFETY: as for the head.
        dst[i] = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Relaxed);
        i += 1;
    }
}

/// Copy `src` into shared memory at `dst`.
///
/// # Safety
/// See the module docs.
pub(super) unsafe fn store(dst: *mut u8, src: &[u8]) {
    let len = src.len();
    let h = head(dst as usize, len);
    let mut i = 0;
    while i < h {
        // SAFETY: `dst + i` is in the shared range.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Relaxed);
        i += 1;
    }
    while i + W <= len {
        let mut w = [0u8; W];
        w.copy_from_slice(&src[i..i + W]);
        // SAFETY: `dst + i` is word-aligned (past the head) and in range.
        unsafe { AtomicUsize::from_ptr(dst.add(i).cast()) }.store(usize::from_ne_bytes(w), Relaxed);
        i += W;
    }
    while i < len {
        // SAFETY: as for the head.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Relaxed);
        i += 1;
    }
}

/// Set `len` bytes of shared memory at `dst` to `byte`.
///
/// # Safety
/// See the module docs.
pub(super) unsafe fn fill(dst: *mut u8, byte: u8, len: usize) {
    let chunk = [byte; 4096];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len());
        // SAFETY: `[dst + off, + n)` is in the shared range.
        unsafe { store(dst.add(off), &chunk[..n]) };
        off += n;
    }
}

/// Copy `len` bytes between two shared ranges that may overlap (memmove semantics), through a
/// private buffer a piece at a time: loaded whole, then stored, front to back when `dst` is below
/// `src` and back to front otherwise, so no piece is overwritten before it is read.
///
/// # Safety
/// See the module docs (both ranges).
pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
    let (d, s) = (dst as usize, src as usize);
    let apart = d.abs_diff(s);
    if (d % W == s % W) && (apart >= len || apart >= W) {
        // Same alignment: word to word, in the direction that reads each word before it can be
        // overwritten (a word is loaded whole before it is stored, so words `W` apart are safe).
        // SAFETY: as documented for this function.
        unsafe { copy_aligned(dst, src, len, d <= s) };
        return;
    }
    const PIECE: usize = 64 << 10;
    let mut buf = vec![0u8; PIECE.min(len)];
    let pieces = len.div_ceil(PIECE.max(1));
    for k in 0..pieces {
        let k = if (dst as usize) <= (src as usize) {
            k
        } else {
            pieces - 1 - k
        };
        let off = k * PIECE;
        let n = (len - off).min(PIECE);
        // SAFETY: both `[+off, +n)` pieces are in their shared ranges.
        unsafe {
            load(src.add(off), &mut buf[..n]);
            store(dst.add(off), &buf[..n]);
        }
    }
}

/// `copy` for two shared ranges with the same alignment modulo a word, `W` or more bytes apart
/// (or not overlapping): bytes to the boundary, then words four at a time, then bytes.
///
/// # Safety
/// See the module docs (both ranges).
unsafe fn copy_aligned(dst: *mut u8, src: *const u8, len: usize, forward: bool) {
    let byte = |i: usize| {
        // SAFETY: `i < len`: in both ranges; a byte has any alignment.
        unsafe {
            let v = AtomicU8::from_ptr(src.add(i).cast_mut()).load(Relaxed);
            AtomicU8::from_ptr(dst.add(i)).store(v, Relaxed);
        }
    };
    let word = |i: usize| {
        // SAFETY: `i` is past the head, so both `src + i` and `dst + i` are word-aligned (same
        // alignment), and `i + W <= len`.
        unsafe {
            let v = AtomicUsize::from_ptr(src.add(i).cast_mut().cast()).load(Relaxed);
            AtomicUsize::from_ptr(dst.add(i).cast()).store(v, Relaxed);
        }
    };
    let h = head(dst as usize, len);
    let body = (len - h) / W * W;
    if forward {
        (0..h).for_each(byte);
        let mut i = h;
        while i + 4 * W <= h + body {
            word(i);
            word(i + W);
            word(i + 2 * W);
            word(i + 3 * W);
            i += 4 * W;
        }
        while i < h + body {
            word(i);
            i += W;
        }
        (h + body..len).for_each(byte);
    } else {
        (h + body..len).rev().for_each(byte);
        let mut i = h + body;
        while i > h {
            i -= W;
            word(i);
        }
        (0..h).rev().for_each(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_and_length_round_trips_and_overlaps_move_like_memmove() {
        let mut shared = vec![0u8; 256];
        let p = shared.as_mut_ptr();
        for off in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 100] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + off) as u8).collect();
                let mut back = vec![0u8; len];
                // SAFETY: in range of `shared`, which only these functions touch here.
                unsafe {
                    store(p.add(off), &data);
                    load(p.add(off), &mut back);
                }
                assert_eq!(back, data, "off {off} len {len}");
            }
        }
        // Overlapping copies in both directions, at odd distances.
        for (d, s) in [
            (3usize, 0usize),
            (0, 3),
            (1, 9),
            (9, 1),
            (16, 0),
            (0, 16),
            (8, 0),
            (0, 8),
        ] {
            let init: Vec<u8> = (0..200u8).collect();
            let mut expect = init.clone();
            expect.copy_within(s..s + 150, d);
            let mut buf = init.clone();
            let q = buf.as_mut_ptr();
            // SAFETY: both ranges are inside `buf`.
            unsafe { copy(q.add(d), q.add(s), 150) };
            assert_eq!(buf, expect, "dst {d} src {s}");
        }
        // SAFETY: in range.
        unsafe { fill(p.add(5), 0xd5, 200) };
        assert!(shared[5..205].iter().all(|&b| b == 0xd5));
        assert_eq!(shared[205], 0);
    }
}
