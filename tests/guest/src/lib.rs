//! Shared by the test guest programs and the host-side tests that check
//! their effects.

/// The marker word for `seed` (SplitMix64 of the seed), so that host and
/// guest agree on it without it appearing in any file.
pub fn marker_word(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #[test]
    fn markers_differ_per_seed_and_are_not_trivial() {
        let (a, b) = (super::marker_word(1), super::marker_word(2));
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_ne!(a.to_le_bytes()[0..4], [0; 4]);
    }
}
