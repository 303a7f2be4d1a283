//! A fluid, block-level simulation of a lab swarm whose block choices are made by the real
//! [`boottorrent_swarm::picker::Picker`]. First step of issue #18 item 2: hosts with their own
//! link rates behind access switches with a shared uplink, the server on its own link.
//! Bandwidth is shared equally among a link's active flows and recomputed at every block
//! completion (discrete events); latency, TCP dynamics, CPU and disk are not modelled.

use boottorrent_bt::wire::BlockRef;
use boottorrent_bt::{Bitfield, Geometry};
use boottorrent_swarm::picker::{Picker, Received};

/// Blocks a host keeps requested from one peer, as the engine's request pipeline does.
const IN_FLIGHT_PER_PEER: usize = 4;

/// One simulated lab.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Image size in bytes.
    pub image_len: u64,
    /// Piece size in bytes.
    pub piece_len: u32,
    /// Leechers (the server is extra).
    pub hosts: usize,
    /// Host link rate in bytes/s, both ways.
    pub host_rate: f64,
    /// Server link rate in bytes/s.
    pub server_rate: f64,
    /// Hosts per access switch.
    pub per_switch: usize,
    /// Access switch uplink rate in bytes/s.
    pub uplink_rate: f64,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Seconds until the last host had every piece.
    pub last_done: f64,
    /// Image copies the server sent.
    pub server_copies: f64,
}

struct Flow {
    from: usize,
    to: usize,
    block: BlockRef,
    left: f64,
}

impl Lab {
    /// Runs the lab to completion (or `limit` seconds).
    pub fn run(&self, limit: f64) -> Outcome {
        let geometry = Geometry {
            total_len: self.image_len,
            piece_len: self.piece_len,
        };
        let n = geometry.piece_count();
        let server = self.hosts;
        let switch_of = |h: usize| {
            if h == server {
                usize::MAX
            } else {
                h / self.per_switch.max(1)
            }
        };
        let mut pickers: Vec<Picker> = (0..self.hosts)
            .map(|_| Picker::new(geometry, Bitfield::new(n)))
            .collect();
        let mut have: Vec<Bitfield> = (0..self.hosts).map(|_| Bitfield::new(n)).collect();
        have.push(Bitfield::full(n));
        for p in pickers.iter_mut() {
            p.add_availability(&Bitfield::full(n), false);
        }
        let switches = self.hosts.div_ceil(self.per_switch.max(1));
        let mut flows: Vec<Flow> = Vec::new();
        let mut in_flight = vec![vec![0usize; self.hosts + 1]; self.hosts];
        let mut done_at = vec![None; self.hosts];
        let mut server_bytes = 0.0;
        let mut t = 0.0;
        while t < limit {
            // Requests: every unfinished host tops up its pipeline with every peer.
            for h in 0..self.hosts {
                if pickers[h].is_complete() {
                    continue;
                }
                for peer in 0..=self.hosts {
                    if peer == h || in_flight[h][peer] >= IN_FLIGHT_PER_PEER {
                        continue;
                    }
                    let in_zone = peer != server && switch_of(peer) == switch_of(h);
                    let want = IN_FLIGHT_PER_PEER - in_flight[h][peer];
                    let picked = pickers[h].pick(peer as u64, &have[peer], in_zone, want);
                    for block in picked {
                        in_flight[h][peer] += 1;
                        flows.push(Flow {
                            from: peer,
                            to: h,
                            block,
                            left: f64::from(block.len),
                        });
                    }
                }
            }
            if flows.is_empty() && pickers.iter().all(Picker::is_complete) {
                break;
            }
            // Equal shares: each flow gets the smallest share among the links it crosses.
            let mut up = vec![0usize; self.hosts + 1];
            let mut down = vec![0usize; self.hosts];
            let mut sw = vec![0usize; switches];
            for f in &flows {
                up[f.from] += 1;
                down[f.to] += 1;
                if switch_of(f.from) != switch_of(f.to) {
                    if f.from != server {
                        sw[switch_of(f.from)] += 1;
                    }
                    sw[switch_of(f.to)] += 1;
                }
            }
            // Discrete events: advance to the next block completion at the current shares.
            let rates: Vec<f64> = flows
                .iter()
                .map(|f| {
                    let up_rate = if f.from == server {
                        self.server_rate
                    } else {
                        self.host_rate
                    };
                    let mut rate =
                        (up_rate / up[f.from] as f64).min(self.host_rate / down[f.to] as f64);
                    if switch_of(f.from) != switch_of(f.to) {
                        if f.from != server {
                            rate = rate.min(self.uplink_rate / sw[switch_of(f.from)] as f64);
                        }
                        rate = rate.min(self.uplink_rate / sw[switch_of(f.to)] as f64);
                    }
                    rate
                })
                .collect();
            let step = flows
                .iter()
                .zip(&rates)
                .map(|(f, r)| f.left / r)
                .fold(f64::INFINITY, f64::min);
            let mut finished = Vec::new();
            for (i, (f, r)) in flows.iter_mut().zip(&rates).enumerate() {
                let sent = (r * step).min(f.left);
                f.left -= sent;
                if f.from == server {
                    server_bytes += sent;
                }
                // A relative tolerance: float steps leave crumbs of a byte.
                if f.left <= 1e-6 {
                    finished.push(i);
                }
            }
            t += step;
            for i in finished.into_iter().rev() {
                let f = flows.swap_remove(i);
                in_flight[f.to][f.from] -= 1;
                if let Received::PieceDone { .. } = pickers[f.to].received(f.from as u64, f.block) {
                    pickers[f.to].verified(f.block.piece, true);
                    have[f.to].set(f.block.piece);
                    for (o, p) in pickers.iter_mut().enumerate() {
                        if o != f.to {
                            p.add_piece(f.block.piece, switch_of(o) == switch_of(f.to));
                        }
                    }
                    if pickers[f.to].is_complete() {
                        done_at[f.to] = Some(t);
                    }
                }
            }
        }
        Outcome {
            last_done: done_at
                .iter()
                .map(|d| d.unwrap_or(f64::INFINITY))
                .fold(0.0, f64::max),
            server_copies: server_bytes / self.image_len as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(hosts: usize) -> Lab {
        Lab {
            image_len: 16 << 20,
            piece_len: 256 << 10,
            hosts,
            host_rate: 12.5e6,
            server_rate: 12.5e6,
            per_switch: 40,
            uplink_rate: 1.25e9,
        }
    }

    #[test]
    fn one_host_alone_takes_size_over_rate() {
        let l = lab(1);
        let out = l.run(100.0);
        let ideal = l.image_len as f64 / l.host_rate;
        assert!(
            (out.last_done - ideal).abs() / ideal < 0.05,
            "{out:?} vs {ideal}"
        );
        assert!((out.server_copies - 1.0).abs() < 0.01, "{out:?}");
    }

    #[test]
    fn a_swarm_is_never_faster_than_physics_and_beats_unicast() {
        let l = lab(8);
        let out = l.run(100.0);
        let ideal = l.image_len as f64 / l.host_rate;
        assert!(out.last_done >= ideal * 0.99, "{out:?} vs {ideal}");
        assert!(out.last_done < ideal * 8.0 * 0.5, "{out:?}");
        assert!(out.server_copies >= 0.99, "{out:?}");
    }
}
