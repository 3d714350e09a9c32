import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { RemoteGpuError, problemFrom } from './errors';
import type { IJob, IJobList, IRemoteGpuApi, IStatusReply } from './types';

/**
 * Call a `/remote-gpu/` endpoint and parse its JSON answer.
 *
 * Throws `RemoteGpuError` for every failure, with a message and a hint.
 */
export async function requestAPI<T>(
  endpoint: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'remote-gpu', endpoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new RemoteGpuError({
      reason: 'jupyter',
      message: `JupyterLab's own server did not answer (${String(error)}).`,
      hint: 'Check that the Jupyter server is still running.',
      url: ''
    });
  }
  const raw = await response.text();
  let body: unknown = null;
  if (raw.length > 0) {
    try {
      body = JSON.parse(raw);
    } catch {
      body = { message: raw.split('\n')[0] };
    }
  }
  if (!response.ok) {
    throw new RemoteGpuError(problemFrom(response.status, body));
  }
  return body as T;
}

/** The sidebar's API through the Jupyter server extension. */
export class ServerExtensionApi implements IRemoteGpuApi {
  status(): Promise<IStatusReply> {
    return requestAPI<IStatusReply>('status');
  }

  async jobs(): Promise<IJobList> {
    // A bare list: the server extension of a version before the count.
    const reply = await requestAPI<IJobList | IJob[]>('jobs');
    return Array.isArray(reply) ? { jobs: reply, total: null } : reply;
  }

  async cancelJob(id: number | string): Promise<void> {
    await requestAPI<unknown>(`jobs/${encodeURIComponent(String(id))}/cancel`, {
      method: 'POST'
    });
  }

  async releaseSession(id: string): Promise<void> {
    await requestAPI<unknown>(
      `sessions/${encodeURIComponent(id)}/release`,
      { method: 'POST' }
    );
  }

  async restartSession(id: string): Promise<void> {
    await requestAPI<unknown>(
      `sessions/${encodeURIComponent(id)}/restart`,
      { method: 'POST' }
    );
  }
}
