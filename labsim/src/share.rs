//! Max-min fair sharing of links among flows (progressive filling), which is what long-lived
//! TCP flows through drop-tail queues approach: every flow gets the same share of its
//! bottleneck, and what a flow cannot use at one link goes to the others there.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A link's fair share candidate in the heap, smallest share first.
struct Candidate {
    share: f64,
    link: usize,
    version: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and the smallest share saturates first.
        other
            .share
            .total_cmp(&self.share)
            .then(other.link.cmp(&self.link))
    }
}

/// Rates for `paths` (each a flow's links, indices into `capacity`, in bytes per second):
/// max-min fair. A flow crossing no link gets nothing (it has no bottleneck to be fair at).
pub fn max_min(capacity: &[f64], paths: &[Vec<usize>]) -> Vec<f64> {
    let mut rate = vec![0.0; paths.len()];
    let mut left: Vec<f64> = capacity.to_vec();
    let mut count = vec![0u32; capacity.len()];
    let mut flows_of: Vec<Vec<usize>> = vec![Vec::new(); capacity.len()];
    for (f, path) in paths.iter().enumerate() {
        for &l in path {
            count[l] += 1;
            flows_of[l].push(f);
        }
    }
    let mut version = vec![0u32; capacity.len()];
    let mut heap = BinaryHeap::new();
    for l in 0..capacity.len() {
        if count[l] > 0 {
            heap.push(Candidate {
                share: left[l] / f64::from(count[l]),
                link: l,
                version: 0,
            });
        }
    }
    let mut frozen = vec![false; paths.len()];
    while let Some(c) = heap.pop() {
        if c.version != version[c.link] || count[c.link] == 0 {
            continue;
        }
        let share = c.share.max(0.0);
        for &f in &flows_of[c.link] {
            if frozen[f] {
                continue;
            }
            frozen[f] = true;
            rate[f] = share;
            for &l in &paths[f] {
                left[l] -= share;
                count[l] -= 1;
                version[l] += 1;
                if count[l] > 0 && l != c.link {
                    heap.push(Candidate {
                        share: left[l].max(0.0) / f64::from(count[l]),
                        link: l,
                        version: version[l],
                    });
                }
            }
        }
    }
    rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_limited_elsewhere_leaves_its_share_to_the_others() {
        // Link 0 (10) carries flows 0 and 1; flow 1 also crosses link 1 (2).
        let r = max_min(&[10.0, 2.0], &[vec![0], vec![0, 1]]);
        assert!((r[1] - 2.0).abs() < 1e-9, "{r:?}");
        assert!((r[0] - 8.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn a_local_flow_takes_what_a_congested_uplink_leaves() {
        // One host link (10) carries a local flow and five flows through an uplink of 1.
        let mut paths = vec![vec![0, 1]];
        paths.extend((0..5).map(|_| vec![0, 2, 3]));
        let r = max_min(&[10.0, 10.0, 10.0, 1.0], &paths);
        assert!((r[0] - 9.0).abs() < 1e-9, "{r:?}");
        assert!(r[1..].iter().all(|x| (x - 0.2).abs() < 1e-9), "{r:?}");
    }

    #[test]
    fn equal_flows_share_equally() {
        let r = max_min(&[9.0], &[vec![0], vec![0], vec![0]]);
        assert!(r.iter().all(|x| (x - 3.0).abs() < 1e-9), "{r:?}");
    }
}
