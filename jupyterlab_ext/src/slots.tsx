// A slot in the sidebar's GPU list: meters, the recent-history plot, the holder.

import React from 'react';

import {
  baseName,
  formatBytes,
  formatDuration,
  formatPercent,
  fraction
} from './format';
import { now, seconds } from './model';
import { Sparkline } from './sparkline';
import type { IReadings, ISlot } from './types';

function Meter({
  label,
  value,
  text,
  title
}: {
  label: string;
  value: number | null;
  text: string;
  title?: string;
}): JSX.Element {
  const level = value === null ? '' : value > 0.9 ? ' jp-mod-high' : '';
  return (
    <div
      className="jp-RemoteGpu-meter"
      data-label={label}
      title={title ?? `${label}: ${text}`}
    >
      <span className="jp-RemoteGpu-meterLabel">{label}</span>
      <span className="jp-RemoteGpu-meterTrack">
        <span
          className={`jp-RemoteGpu-meterFill${level}`}
          style={{ width: `${Math.round((value ?? 0) * 100)}%` }}
        />
      </span>
      <span className="jp-RemoteGpu-meterText">{text}</span>
    </div>
  );
}

/** A CPU slot's memory meter says whose memory it measures against what. */
function memoryTitle(r: IReadings): string {
  const used = formatBytes(r.memory_used);
  const host = r.host_memory_total ?? null;
  if (host === null || r.memory_total === null || r.memory_total <= 0) {
    return `Mem: ${used} of ${formatBytes(r.memory_total)}`;
  }
  const shares = Math.max(1, Math.round(host / r.memory_total));
  return (
    `Mem: the worker uses ${used} of its share, ${formatBytes(r.memory_total)} ` +
    `(the host's ${formatBytes(host)} shared by ${shares} CPU slot${shares === 1 ? '' : 's'})`
  );
}

/** One slot: its name and health, meters, recent history and holder. */
export function SlotView({
  slot,
  serverTime
}: {
  slot: ISlot;
  serverTime: number;
}): JSX.Element {
  const r = slot.readings;
  const holder = slot.holder;
  return (
    <li
      className={`jp-RemoteGpu-slot${holder?.mine ? ' jp-mod-mine' : ''}`}
      data-slot={slot.id}
    >
      <div className="jp-RemoteGpu-row">
        <span className="jp-RemoteGpu-name" title={slot.uuid || slot.id}>
          {slot.name}
        </span>
        <Health slot={slot} />
      </div>
      <div className="jp-RemoteGpu-sub">
        {slot.id}
        {slot.pool ? ` · pool ${slot.pool}` : ''}
        {slot.env ? ` · env ${slot.env}` : ''}
      </div>
      {slot.problem && <div className="jp-RemoteGpu-jobError">{slot.problem}</div>}
      {r === null ? (
        <div className="jp-RemoteGpu-sub">No NVML readings ({slot.kind} slot).</div>
      ) : (
        <>
          <Meter
            label="Util"
            value={fraction(r.utilization, 100)}
            text={formatPercent(r.utilization)}
          />
          <Meter
            label="Mem"
            value={fraction(r.memory_used, r.memory_total)}
            text={`${formatBytes(r.memory_used)} / ${formatBytes(r.memory_total)}`}
            title={memoryTitle(r)}
          />
          <div className="jp-RemoteGpu-sub">{sensors(r)}</div>
        </>
      )}
      {slot.history && (
        <Sparkline history={slot.history} readings={r} now={serverTime} />
      )}
      <div className="jp-RemoteGpu-holder" data-holder={holder ? holder.user : ''}>
        {holder === null && slot.draining ? (
          <span className="jp-RemoteGpu-drainingNote">
            not leased until it is drained
          </span>
        ) : holder === null ? (
          <span className="jp-RemoteGpu-free">free</span>
        ) : (
          <>
            held by <b>{holder.mine ? 'you' : holder.user}</b>
            {holder.notebook ? (
              <span title={holder.notebook}> ({baseName(holder.notebook)})</span>
            ) : null}{' '}
            for {formatDuration(now() - seconds(holder.since))}
          </>
        )}
      </div>
    </li>
  );
}

/** healthy, draining (what holds it on hover: pids for an admin) or unhealthy. */
function Health({ slot }: { slot: ISlot }): JSX.Element {
  const draining = slot.draining ?? null;
  if (draining !== null) {
    const held = draining.processes
      .map(
        p =>
          `${p.pid === null ? 'a process' : `pid ${p.pid}`} (${formatBytes(p.memory)})`
      )
      .join(', ');
    return (
      <span
        className="jp-RemoteGpu-badge jp-mod-draining"
        title={`A stopped worker's processes still hold this slot: ${held}. It is not leased until they exit.`}
        data-pids={draining.pids.join(',')}
      >
        draining
      </span>
    );
  }
  return (
    <span
      className={`jp-RemoteGpu-badge ${slot.healthy ? 'jp-mod-ok' : 'jp-mod-bad'}`}
    >
      {slot.healthy ? 'healthy' : 'unhealthy'}
    </span>
  );
}

/** Temperature, power and processes, leaving out what the slot does not report. */
function sensors(r: IReadings): string {
  const parts: string[] = [];
  if (r.temperature !== null) {
    parts.push(`${Math.round(r.temperature)} °C`);
  }
  if (r.power !== null) {
    parts.push(`${Math.round(r.power)} W`);
  }
  const n = r.processes.length;
  parts.push(n === 1 ? '1 process' : `${n} processes`);
  return parts.join(' · ');
}
