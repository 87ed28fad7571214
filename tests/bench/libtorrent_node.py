#!/usr/bin/python3
"""One libtorrent node for shoal-wan-bench (tests/src/bin/shoal-wan-bench.rs).

    libtorrent_node.py make TORRENT FILE URL PIECE_SIZE
        writes a v1 torrent of FILE with URL as its web seed (BEP 19); URL "-" for none.
    libtorrent_node.py run TORRENT SAVE_DIR PORT PEER_PORT,...
        downloads into SAVE_DIR listening on 127.0.0.1:PORT, connected to the other nodes on
        127.0.0.1 over TCP (uTP, DHT, local service discovery, PEX, UPnP and NAT-PMP off), prints
        "done SECONDS" on stdout when every piece is in and checked, then seeds until killed.
    libtorrent_node.py get TORRENT SAVE_DIR PORT PEER_PORT,...
        the same, but exits at once after "done" (for shoal-bench's seed-to-leecher timing).

Needs Debian's python3-libtorrent (libtorrent-rasterbar 2.0) and /usr/bin/python3.
"""

import os
import sys
import time

import libtorrent as lt


def make(torrent, path, url, piece_size):
    fs = lt.file_storage()
    lt.add_files(fs, path)
    ct = lt.create_torrent(fs, int(piece_size), flags=lt.create_torrent.v1_only)
    if url != "-":
        ct.add_url_seed(url)
    lt.set_piece_hashes(ct, os.path.dirname(os.path.abspath(path)))
    with open(torrent, "wb") as f:
        f.write(lt.bencode(ct.generate()))


def run(torrent, save_dir, port, peers, exit_when_done=False):
    ses = lt.session(
        {
            "listen_interfaces": f"127.0.0.1:{port}",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "allow_multiple_connections_per_ip": True,
            # TCP only, as Shoal's nodes use here: libtorrent dials uTP first by default, and
            # uTP's delay-based congestion control stalls on loopback (5 MiB/s for 1 GiB).
            # Encryption stays at libtorrent's default (RC4 when both ends allow it).
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "alert_mask": 0,
        }
    )
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = save_dir
    atp.flags |= lt.torrent_flags.disable_pex | lt.torrent_flags.disable_dht
    atp.flags |= lt.torrent_flags.disable_lsd
    t0 = time.monotonic()
    h = ses.add_torrent(atp)
    ports = [int(p) for p in peers.split(",") if p and int(p) != int(port)]
    last_connect = 0.0
    while not h.status().is_seeding:
        now = time.monotonic()
        # Every second, (re)connect to the peers that are not connected yet.
        if now - last_connect > 1.0:
            connected = {p.ip[1] for p in h.get_peer_info()}
            for p in ports:
                if p not in connected:
                    h.connect_peer(("127.0.0.1", p))
            last_connect = now
        time.sleep(0.01)
    print(f"done {time.monotonic() - t0:.3f}", flush=True)
    if exit_when_done:
        # Every piece is checked and handed to the disk threads; skip the session's
        # teardown (tracker and peer goodbyes), which is not part of the download.
        os._exit(0)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "make":
        make(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "run":
        run(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "get":
        run(*sys.argv[2:], exit_when_done=True)
    else:
        sys.exit(__doc__)
